"""Runs sorted into studies and into the paper's parts: baseline, Table 1, the ladder, Tables 2a/2b.

The runs of one network and schedule are one study; which run plays which part follows from the configs,
as in the paper:

- the **baseline** is the smallest ``kn`` (§5.2: ``kn = 256``);
- Table 1 and Figure 2 compare the warmups at every ``kn`` run with more than one warmup mode (the
  paper's is 8k, §5.2); the largest of them is the **large** ``kn`` of Figure 4;
- the **ladder** of Figures 1 and 3 is every ``kn`` under the study's recipe (gradual warmup and the
  rule, zero-gamma and ``optim.base_lr`` most of its runs have); Table 2a varies the rate (``optim.lr_rule``
  or ``optim.base_lr``), Table 2b ``model.zero_init_residual``, at whichever ``kn`` they were run.

A setting changed for a study of its own (three or more ``kn``, or more than one warmup at one) is a
variant of the study (:attr:`Study.variants`, e.g. ``zg-off``). Runs of different networks (depth and, for
the CIFAR ResNet, ``model.shortcut``), planned epochs, precisions or devices are separate studies
(:func:`split_studies`); methods beyond the paper (LARS, poly decay, another warmup length) are set beside
the recipe's ladder (:class:`Methods`, results/beyond.md).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .runs import Run

# --------------------------------------------------------------------------- the study's parts

# the settings Tables 2a/2b vary, at the paper's values (§2.1, §5.1); base_lr's is the configs' own
PAPER_RECIPE: dict[str, Any] = {"rule": "linear", "zero_gamma": True, "base_lr": None}


def usual(values: list[Any], paper: Any) -> Any:
    """The value most runs of a study have (the paper's on a tie): the recipe the study varies from."""
    return max(set(values), key=lambda v: (values.count(v), v == paper))


def matching(runs: list[Run], want: dict[str, Any]) -> list[Run]:
    """The runs whose summary row has every ``key: value`` of ``want``."""
    return [r for r in runs if all(r.row[k] == v for k, v in want.items())]


def setting_name(setting: dict[str, Any], recipe: dict[str, Any]) -> str:
    """A short name for where ``setting`` differs from ``recipe``: ``zg-off``, ``sqrt-rule``, ``lr0.05``."""
    parts = []
    for key, value in setting.items():
        if value != recipe[key]:
            parts.append({"zero_gamma": f"zg-{'on' if value else 'off'}", "rule": f"{value}-rule"}.get(
                key, f"lr{value:g}" if isinstance(value, float) else f"{key}-{value}"))
    return "_".join(parts)


@dataclass
class Study:
    """The runs sorted into the paper's parts (see the module docstring)."""

    runs: list[Run]
    base_kn: int
    warmup_kns: list[int]  # every kn with more than one warmup mode (Table 1, Figure 2), ascending
    default: dict[str, Any] = field(default_factory=dict)  # the recipe's settings Tables 2a/2b vary

    @property
    def large_kn(self) -> int | None:
        return self.warmup_kns[-1] if self.warmup_kns else None

    @classmethod
    def of(cls, runs: list[Run], default: dict[str, Any] | None = None) -> Study:
        """The study of ``runs`` under ``default`` (the Table 2 settings; by default those most runs have)."""
        if default is None:
            default = {key: usual([r.row[key] for r in runs], paper) for key, paper in PAPER_RECIPE.items()}
        recipe = matching(runs, default)
        base_kn = min(r.row["kn"] for r in (recipe or runs))
        modes: dict[int, set[str]] = defaultdict(set)
        for r in recipe:
            if r.row["kn"] != base_kn:
                modes[r.row["kn"]].add(r.row["warmup"])
        return cls(runs, base_kn, sorted(kn for kn, m in modes.items() if len(m) > 1), default)

    def select(self, **want: Any) -> list[Run]:
        return matching(self.runs, want)

    def recipe(self, **want: Any) -> list[Run]:
        """The runs of the study's recipe (its ``default``: the Table 2 settings most runs have) matching ``want``."""
        return self.select(**{**self.default, **want})

    @cached_property
    def variants(self) -> dict[str, Study]:
        """Every other setting of the Table 2 keys run as a study of its own, by name (e.g. ``zg-off``).

        A setting counts where its runs make a Figure 1 of three or more ``kn`` or a Table 1 (a ``kn`` with
        more than one warmup): e.g. the whole ladder rerun with ``model.zero_init_residual=false``. Its
        runs stay rows of the recipe's Tables 2a/2b too.
        """
        out: dict[str, Study] = {}
        settings = {tuple(r.row[k] for k in PAPER_RECIPE) for r in self.runs}
        for values in sorted(settings, key=str):
            default = dict(zip(PAPER_RECIPE, values))
            if default == self.default:
                continue
            study = Study.of(self.runs, default)
            if len(study.ladder()) >= 3 or study.warmup_kns:
                out[setting_name(default, self.default)] = study
        return out

    def baseline(self) -> list[Run]:
        return self.recipe(kn=self.base_kn)

    def ladder(self) -> dict[int, list[Run]]:
        """kn -> runs of the default recipe (gradual warmup; at the baseline's kn any warmup: it is flat)."""
        out: dict[int, list[Run]] = defaultdict(list)
        for r in self.recipe():
            if r.row["warmup"] == "gradual" or r.row["kn"] == self.base_kn:
                out[r.row["kn"]].append(r)
        return dict(sorted(out.items()))


def comparable_ladders(studies: dict[str, Study]) -> dict[str, dict[int, list[Run]]]:
    """Each study's Figure 1 ladder, where it has more than one kn; empty unless two or more studies have one.

    Gaps are comparable only from baselines at the same kn: a study whose baseline is at a larger kn than
    the others' (e.g. a partial rerun that lacks the baseline runs) is left out of the comparison."""
    ladders = {name: lad for name, lad in ((n, s.ladder()) for n, s in studies.items()) if len(lad) > 1}
    if ladders:
        base = min(studies[name].base_kn for name in ladders)
        ladders = {name: lad for name, lad in ladders.items() if studies[name].base_kn == base}
    return ladders if len(ladders) > 1 else {}


def split_studies(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by network and planned epochs: only runs of one study are compared with each other.

    Where one network and schedule was run in more than one precision (the fp32 check of a bf16 study),
    each precision is a study of its own, named with it: an fp32 rerun of a seed is not a second seed.
    Likewise for devices: where a schedule was run on more than one, the runs off the CPU are studies of
    their own, named with the device (``..._cuda``); the CPU's keep the plain name.
    """
    by_schedule: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_schedule[f"{r.row['arch']}_{r.cfg['schedule']['epochs']}ep"].append(r)
    out: dict[str, list[Run]] = {}
    for name, members in by_schedule.items():
        groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
        for r in members:
            groups[(r.row["precision"], r.row["device"])].append(r)
        precisions, devices = ({key[i] for key in groups} for i in (0, 1))
        for (p, d), group in groups.items():
            named = name if len(precisions) == 1 else f"{name}_{p}"
            out[named if len(devices) == 1 or d == "cpu" else f"{named}_{d}"] = group
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- beyond the paper


def paper_warmup_epochs(runs: list[Run]) -> float:
    """The gradual warmup's length in the study's SGD runs with step decay: the paper's 5 epochs (§2.2) unless
    a whole study changed it."""
    values = [r.row["warmup_epochs"] for r in runs
              if r.row["optim"] == "sgd" and r.row["decay"] == "step" and r.row["warmup"] != "none"]
    return usual(values, 5.0) if values else 5.0


def method_of(row: dict[str, Any], paper_warmup: float) -> str:
    """The method beyond the paper a run tries, by name (``""`` for the paper's SGD with step decay).

    Another optimizer (``LARS``, You et al. 2017), another decay after warmup (``poly decay``), or, for the
    paper's SGD, another warmup length (``SGD, longer warmup``). A method's settings (rate, warmup length)
    are compared with each other at each kn; the best finished one stands for the method."""
    extras = [f"{row['decay']} decay"] if row["decay"] != "step" else []
    if row["optim"] == "sgd" and not extras:
        if row["warmup"] == "none" or row["warmup_epochs"] == paper_warmup:
            return ""
        extras.append("longer warmup" if row["warmup_epochs"] > paper_warmup else "shorter warmup")
    return ", ".join([row["optim"].upper(), *extras])


def split_methods(runs: list[Run]) -> tuple[list[Run], list[Run]]:
    """The study's runs of the paper's recipe and its ablations, and those of methods beyond it."""
    paper_warmup = paper_warmup_epochs(runs)
    beyond = [r for r in runs if method_of(r.row, paper_warmup)]
    return [r for r in runs if r not in beyond], beyond


def mean_val_err(runs: list[Run]) -> float | None:
    """The runs' mean val error over those that did not diverge (``None`` where none has a value)."""
    vals = [r.row["val_err"] for r in runs if not r.diverged and r.row["val_err"] is not None]
    return statistics.mean(vals) if vals else None


def flat_edge(ladder: dict[int, list[Run]], baseline: list[Run], tolerance: float = 0.01) -> int | None:
    """Where the flat region of a ladder ends (§5.2, Figure 1): the largest kn whose mean val error is within
    ``tolerance`` (1 point) of ``baseline``'s, every smaller kn of the ladder within it too; a diverged kn
    ends it. ``None`` where the baseline has no value."""
    base = mean_val_err(baseline)
    if base is None:
        return None
    edge = None
    for kn, runs in sorted(ladder.items()):
        err = mean_val_err(runs)
        if err is None or any(r.diverged for r in runs) or err - base > tolerance:
            break
        edge = kn
    return edge


def finished(run: Run) -> bool:
    """Whether the run trained all its planned epochs (a probe, ``checkpoint.stop_after_epoch``, did not)."""
    return run.diverged or run.row["epochs"] >= run.row["planned_epochs"]


@dataclass
class Methods:
    """Runs of methods beyond the paper beside the recipe's ladder they try to extend (results/beyond.md).

    The reference is the study's recipe with the methods' zero-gamma (a gamma = 1 study is compared with
    the gamma = 1 ladder): its baseline gives the gaps, its ladder the line the methods are drawn against."""

    reference: Study | None
    runs: list[Run]
    paper_warmup: float

    @classmethod
    def of(cls, paper: list[Run], beyond: list[Run]) -> Methods:
        zero_gamma = usual([r.row["zero_gamma"] for r in beyond], True)
        same = [r for r in paper if r.row["zero_gamma"] == zero_gamma]
        reference = None
        if same:
            default = {"rule": "linear", "zero_gamma": zero_gamma,
                       "base_lr": usual([r.row["base_lr"] for r in same], None)}
            reference = Study.of(paper, default)
        return cls(reference, beyond, paper_warmup_epochs(paper + beyond))

    def method(self, run: Run) -> str:
        return method_of(run.row, self.paper_warmup)

    def best(self) -> dict[str, dict[int, list[Run]]]:
        """method -> kn -> the runs (seeds) of its finished setting (rate, warmup) with the lowest mean val error;
        a setting whose every run diverged counts as worst."""
        groups: dict[tuple[str, int, tuple], list[Run]] = defaultdict(list)
        for r in self.runs:
            if finished(r):
                groups[(self.method(r), r.row["kn"], (r.row["lr"], r.row["warmup"], r.row["warmup_epochs"]))].append(r)

        def score(rs: list[Run]) -> float:
            err = mean_val_err(rs)
            return math.inf if err is None else err

        out: dict[str, dict[int, list[Run]]] = defaultdict(dict)
        for (method, kn, _), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], score(kv[1]))):
            out[method].setdefault(kn, rs)  # sorted by score: the first is the best
        return {m: dict(sorted(by_kn.items())) for m, by_kn in sorted(out.items())}

    def own_baselines(self) -> dict[str, list[Run]]:
        """method -> its runs at the recipe's baseline kn (e.g. kn 128 with poly decay, no warmup): the
        schedule's own baseline, against which its flat region is measured; methods without one are left out."""
        if self.reference is None:
            return {}
        base_kn = self.reference.base_kn
        return {m: by_kn[base_kn] for m, by_kn in self.best().items() if base_kn in by_kn}

    def recipe_at_epoch(self, run: Run, epoch: int) -> float | None:
        """The val error of the recipe's run of ``run``'s kn and seed at ``epoch`` (to set a probe beside)."""
        if self.reference is None:
            return None
        for r in self.reference.recipe(kn=run.row["kn"], seed=run.row["seed"], warmup=run.row["warmup"]):
            for e in r.epochs:
                if e["epoch"] == epoch:
                    return e["val/err"]
        return None