"""The folders Hydra makes for a command's output, and their removal when the command is refused.

Hydra creates a command's output folder (``hydra.run.dir``, or a sweep's ``hydra.sweep.dir`` and the
job's folder in it), with any missing parents, before the command's own code runs. A command refused
after that (``lbsgd eval`` of a missing checkpoint, ``lbsgd train`` whose ``k*n`` exceeds the data set)
would leave an empty folder behind, named like a run. :meth:`FoldersBefore.note` records, before Hydra
starts, which folders on the way to the output exist; after a refusal :meth:`FoldersBefore.remove_new`
removes the output folder and those parents that this call created and that are still empty (Hydra's
``multirun.yaml`` of a sweep that ran nothing aside). A folder that existed before the call, or one with
anything else in it, stays.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

# Hydra's record of a sweep, written into the sweep folder before the first job starts
SWEEP_RECORD = "multirun.yaml"


def static_folder(template: str) -> Path:
    """The deepest folder of an output-dir template that does not depend on the run: ``runs/eval`` of
    ``runs/eval/${run_name:...}``, the template itself if it has no interpolation."""
    if "${" not in template:
        return Path(template)
    head = template.split("${", 1)[0]
    return Path(head) if head.endswith("/") or not head else Path(head).parent


@dataclass
class FoldersBefore:
    """Which folders on the way to a command's output existed before Hydra ran (``existed``), and when
    the call started (a folder made later, under a parent that existed, is the call's own)."""

    started: float = field(default_factory=time.time)
    existed: dict[Path, bool] = field(default_factory=dict)

    @classmethod
    def note(cls, templates: list[str]) -> FoldersBefore:
        """Record the existence of every folder on the way to each output-dir template's static folder."""
        before = cls()
        for template in templates:
            folder = static_folder(template).absolute()
            for path in (folder, *folder.parents):
                before.existed.setdefault(path, path.exists())
        return before

    def _made_by_this_call(self, path: Path) -> bool:
        """``path``, or a folder above it, did not exist before the call (the record says so)."""
        if self.existed.get(path) is not None:
            return not self.existed[path]
        return any(self.existed.get(p) is False for p in path.parents)

    def created(self, output_dir: str | os.PathLike) -> bool:
        """Whether this call created ``output_dir`` (ask before the command writes into it): known from the
        record, or, for a name the record could not know (the run's own), a folder whose inode changed
        only after the call started, in a folder the record knows."""
        path = Path(output_dir).absolute()
        if path in self.existed or self._made_by_this_call(path):
            return self._made_by_this_call(path)
        try:
            return path.parent in self.existed and os.stat(path).st_ctime >= self.started
        except OSError:
            return False

    def remove_new(self, output_dir: str | os.PathLike, created: bool) -> list[Path]:
        """Remove ``output_dir`` (if ``created``, as :meth:`created` said before the command ran) and then
        its parents that this call made, innermost first, while each is empty; returns the removed."""
        removed: list[Path] = []
        path = Path(output_dir).absolute()
        while path != path.parent and (created if not removed else self._made_by_this_call(path)):
            try:
                entries = os.listdir(path)
                if entries == [SWEEP_RECORD] and removed:  # a sweep folder of this call, no job left in it
                    (path / SWEEP_RECORD).unlink()
                elif entries:
                    break
                path.rmdir()
            except OSError:  # another rank removed it first, or something appeared in it: it stays
                break
            removed.append(path)
            path = path.parent
        return removed
