"""A refused command leaves no folder behind: what :class:`lbsgd_cli.output_dir.FoldersBefore` removes, and
what it keeps (anything that existed before the call, anything with something in it)."""

from __future__ import annotations

import time
from pathlib import Path

from lbsgd_cli.output_dir import FoldersBefore, static_folder


def test_the_static_folder_of_a_template_is_what_does_not_depend_on_the_run():
    assert static_folder("runs/eval/${run_name:${hydra:job.override_dirname}}") == Path("runs/eval")
    assert static_folder("out/run_${now:%H}") == Path("out")
    assert static_folder("/abs/run") == Path("/abs/run")


def test_a_folder_named_at_run_time_is_the_calls_own_only_if_made_after_the_call_started(tmp_path):
    old = tmp_path / "runs" / "old"
    old.mkdir(parents=True)
    before = FoldersBefore.note([f"{tmp_path}/runs/${{now:%H-%M-%S}}"])
    time.sleep(0.05)  # past the file system's coarse clock
    new = tmp_path / "runs" / "new"
    new.mkdir()
    assert before.created(new) and not before.created(old)
    assert before.remove_new(new, before.created(new)) == [new] and (tmp_path / "runs").is_dir()
    assert before.remove_new(old, before.created(old)) == [] and old.is_dir()


def test_new_parents_go_with_the_output_folder_a_sweep_record_too_but_nothing_else(tmp_path):
    before = FoldersBefore.note([f"{tmp_path}/multirun/train"])
    job = tmp_path / "multirun" / "train" / "batch.k=2"
    job.mkdir(parents=True)
    (job.parent / "multirun.yaml").write_text("hydra: {}\n")
    assert before.remove_new(job, before.created(job)) == [job, job.parent, tmp_path / "multirun"]
    assert list(tmp_path.iterdir()) == []
    job.mkdir(parents=True)
    (job / "config.yaml").write_text("{}\n")  # the job wrote something: it and its parents stay
    assert before.remove_new(job, before.created(job)) == [] and (job / "config.yaml").exists()
