"""The points of a ``-m`` sweep, each checked before any of them runs.

Hydra's sweeper runs the points of a sweep (the cartesian product of the swept values, those of the
command line and of ``hydra.sweeper.params``, as in the experiment presets' kn ladders) one after the
other, and each is checked only when it starts. A point that cannot run (``lbsgd train -m
batch.k=1000,2``: k*n larger than the training set) would stop the sweep there, after the points before
it ran, and the points after it would never run. lbsgd refuses such a sweep as a whole, before any point
runs, in one line naming the first bad point (``sweep point batch.k=1000: batch: k*n = ...``): nothing
half-runs, and the corrected command runs every point. :func:`points` lists the points in Hydra's order;
:func:`check_against_data` checks what only the data set can tell (its size, its channels).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import UserError


@dataclass
class Point:
    """One job of a sweep: its overrides, the swept ones of them (its name in messages) and its config."""

    overrides: list[str]
    swept: list[str]
    cfg: Any = None

    @property
    def label(self) -> str:
        return ",".join(self.swept) or "(no swept key)"

    def refused(self, message: str) -> UserError:
        return UserError(f"sweep point {self.label}: {message}; no point of the sweep ran")


def points(overrides: list[str], sweeper_params: dict[str, Any]) -> list[Point]:
    """The jobs Hydra's basic sweeper makes of ``sweeper_params`` (``hydra.sweeper.params``) and the command
    line's ``overrides`` (a key of both: the command line's values), in the order it runs them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([*(f"{k}={v}" for k, v in sweeper_params.items()), *overrides])
    values: dict[str, list[str]] = {}  # per key, in first-seen order; a later override of a key replaces its values
    swept: set[str] = set()
    for o in parsed:  # as hydra's BasicSweeper.split_arguments
        key = o.get_key_element()
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                raise UserError(f"{o.input_line}: a sweep takes a list of values (a,b,c or range(...)), not an interval")
            values[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
            swept.add(key)
        else:
            values[key] = [f"{key}={o.get_value_element_as_str()}"]
            swept.discard(key)
    jobs = [list(job) for job in itertools.product(*values.values())]
    return [Point(job, [o for o in job if o.split("=", 1)[0] in swept]) for job in jobs]


def check_against_data(sweep: list[Point], load: Callable[[Any], Any] | None = None) -> None:
    """Every point of a ``lbsgd train`` sweep fits its data set: k*n images per step at most the training
    set, a torchvision network only for RGB images. Each data set is read once (``load``: a config's
    ``data`` to its data source, :func:`lbsgd_cli.data.load_data`); the first point that does not fit is a
    one-line :class:`UserError` naming it."""
    from omegaconf import OmegaConf

    from .models import check_arch

    if load is None:
        from .data import load_data as load
    seen: dict[str, tuple[int, int]] = {}  # the data config, as YAML -> (training images, channels)
    for point in sweep:
        cfg = point.cfg
        key = OmegaConf.to_yaml(cfg.data, resolve=True)
        try:
            if key not in seen:
                data = load(cfg.data)
                seen[key] = (data.train_size, data.in_channels)
                del data
            train_size, channels = seen[key]
            k, n = cfg.batch.k, cfg.batch.n
            if k * n > train_size:  # the check lbsgd train makes when it starts
                raise UserError(f"batch: k*n = {k * n} is larger than the training set ({train_size} images)")
            check_arch(cfg.model.arch, channels)
        except UserError as exc:
            raise point.refused(str(exc)) from None
