"""``lbsgd plot``: the paper's tables and figures from run directories alone.

    lbsgd plot RUN_OR_SWEEP_DIR... [--out DIR]

Every folder below the given paths that holds a ``config.yaml`` and a ``metrics.jsonl`` (written by
``lbsgd train``) is one run; ``summary.json`` adds whether it diverged and ``run_info.json`` the device
it ran on. Nothing else is read, so a user's own ImageNet sweep gets the same figures as the CIFAR runs
of ``results/``. The runs of one network and schedule are one study; which run plays which part follows
from the configs, as in the paper:

- the **baseline** is the smallest ``kn`` (§5.2: ``kn = 256``);
- Table 1 and Figure 2 compare the warmups at every ``kn`` run with more than one warmup mode (the
  paper's is 8k, §5.2); the largest of them is the **large** ``kn`` of Figure 4;
- the **ladder** of Figures 1 and 3 is every ``kn`` under the study's recipe (gradual warmup and the
  rule, zero-gamma and ``optim.base_lr`` most of its runs have: the paper's linear rule and zero-gamma
  unless a sweep changed them all); Table 2a varies the rate, by
  ``optim.lr_rule`` or by ``optim.base_lr`` (the paper's ``0.05·k`` and ``0.2·k`` rows), and Table 2b
  ``model.zero_init_residual``, at whichever ``kn`` they were run.

Where one of those settings was changed for a study of its own (e.g. the ladder and Table 1 rerun with
``model.zero_init_residual=false``: three or more ``kn``, or more than one warmup at one), that setting's
runs also get a Table 1 and Figure 1 of their own, named after it (``zg-off``), with figures in a
subfolder ``<study>_zg-off``.

Runs of different networks, planned epochs, precisions or devices (the same study on a CPU and on a GPU)
are separate studies, each with its own tables and figures (in a subfolder of ``--out`` named after it);
where two or more studies (or settings) have a ladder from the same baseline ``kn``, Figure 1 is also drawn
and tabulated across them (does the flat region move with the number of steps?).

Where the same run (network, schedule, precision, setting and seed) was done on more than one device,
``tables.md`` also sets them side by side: how far a device moves a result, beside the seed spread.

Writes ``summary.csv`` (one row per run), ``tables.md`` and, with matplotlib (``pip install
'lbsgd[plots]'``), ``fig1_err_vs_kn.png`` ... ``fig4_train_val.png``. A diverged run is shown as
diverged, never as a number, and is left out of means. Errors are the median val error of the last
5 epochs (the paper's metric, §5.1 footnote), mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from . import rules
from .choices import LRRule
from .errors import UserError
from .metrics import read_metrics

FIELDS = ["experiment", "kn", "k", "n", "lr", "warmup", "zero_gamma", "seed", "epochs", "val_err", "train_err",
          "steps", "diverged", "rule", "arch", "precision", "run", "base_lr", "device", "optim", "decay",
          "warmup_epochs", "planned_epochs"]


@dataclass
class Run:
    """One run directory: its config, per-epoch records and summary row."""

    path: Path
    cfg: dict[str, Any]
    epochs: list[dict[str, Any]]
    records: list[dict[str, Any]] = field(default_factory=list)  # every record, per-iteration ones too
    row: dict[str, Any] = field(default_factory=dict)

    @property
    def diverged(self) -> bool:
        return bool(self.row["diverged"])


def peak_lr(cfg: dict[str, Any]) -> float:
    """The run's rate after warmup: :func:`rules.peak_lr` (§2.1) of its saved config."""
    o, b = cfg["optim"], cfg["batch"]
    return rules.peak_lr(o["base_lr"], b["k"], b["n"], o["ref_batch"], LRRule(o["lr_rule"]))


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run directory at or below ``paths`` (sorted, each once)."""
    dirs: set[Path] = set()
    for p in paths:
        if not p.is_dir():
            raise UserError(f"{p}: no such run directory or sweep folder")
        found = {c.parent for c in p.rglob("config.yaml") if (c.parent / "metrics.jsonl").exists()}
        if (p / "config.yaml").exists() and (p / "metrics.jsonl").exists():
            found.add(p)
        dirs |= found
    runs = [r for r in (load_run(d) for d in sorted(dirs)) if r is not None]
    if not runs:
        raise UserError(f"no run with a config.yaml, a metrics.jsonl and a finished epoch under {', '.join(map(str, paths))}")
    return runs


def load_run(path: Path) -> Run | None:
    try:
        cfg = yaml.safe_load((path / "config.yaml").read_text())
        records = read_metrics(path / "metrics.jsonl")
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: cannot read the run ({exc})") from None
    epochs = [r for r in records if "val/err" in r]
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if not epochs and not summary.get("diverged"):
        return None
    last5 = sorted(r["val/err"] for r in epochs[-5:])
    steps = max((r.get("step", r.get("iter", 0)) for r in records), default=0)
    # a run stopped by a non-finite loss says so in its summary; older runs show it as a nan loss
    diverged = bool(summary.get("diverged")) or any(
        not math.isfinite(r["train/loss"]) for r in records if isinstance(r.get("train/loss"), float))
    run = Run(path, cfg, epochs, records)
    run.row = {
        "experiment": path.parent.name,
        "kn": cfg["batch"]["k"] * cfg["batch"]["n"],
        "k": cfg["batch"]["k"],
        "n": cfg["batch"]["n"],
        "lr": round(peak_lr(cfg), 6),
        "warmup": cfg["schedule"]["warmup"],
        "zero_gamma": cfg["model"]["zero_init_residual"],
        "seed": cfg["seed"],
        "epochs": len(epochs),
        "val_err": None if diverged or not last5 else round(last5[len(last5) // 2], 5),
        "train_err": None if diverged or not epochs else round(epochs[-1]["train/err"], 5),
        "steps": int(summary.get("diverged_at_iteration") or steps),
        "diverged": diverged,
        "rule": cfg["optim"]["lr_rule"],
        "arch": cfg["model"]["arch"] + (f"-{cfg['model']['depth']}" if cfg["model"]["arch"] == "cifar_resnet" else ""),
        "precision": cfg.get("precision", "fp32"),
        "run": path.name,
        "base_lr": cfg["optim"]["base_lr"],
        "device": run_device(path / "run_info.json"),
        # beyond the paper (results/beyond.md): runs from before these keys existed had the paper's values
        "optim": cfg["optim"].get("name", "sgd"),
        "decay": cfg["schedule"].get("decay", "step"),
        "warmup_epochs": float(cfg["schedule"].get("warmup_epochs", 5.0)),
        "planned_epochs": cfg["schedule"]["epochs"],
    }
    return run


def run_device(run_info: Path) -> str:
    """The device type a run trained on (``cpu``, ``cuda``), from its ``run_info.json``; ``unknown`` without one.

    A run resumed on another device type is ``cpu+cuda``: neither study's, so a study of its own."""
    try:
        starts = json.loads(run_info.read_text())["starts"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"
    kinds = sorted({str(s.get("device", "unknown")).split(":")[0] for s in starts}) or ["unknown"]
    return "+".join(kinds)


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


def cell(runs: list[Run]) -> str:
    """``mean ± std`` in percent over the runs that did not diverge; ``diverged`` where one did."""
    vals = [r.row["val_err"] for r in runs if not r.diverged and r.row["val_err"] is not None]
    div = sum(r.diverged for r in runs)
    if not vals:
        return "diverged" if div else "-"
    text = f"{100 * vals[0]:.2f}" if len(vals) == 1 else (
        f"{100 * statistics.mean(vals):.2f} ± {100 * statistics.stdev(vals):.2f}")
    return text + (f" ({div} diverged)" if div else "")


def last(runs: list[Run]) -> str:
    """The last epoch's train and val error in percent, averaged over the runs that did not diverge."""
    ok = [r for r in runs if not r.diverged and r.epochs]
    if not ok:
        return "diverged" if runs else "-"
    train = statistics.mean(r.epochs[-1]["train/err"] for r in ok)
    val = statistics.mean(r.epochs[-1]["val/err"] for r in ok)
    return f"{100 * train:.2f} / {100 * val:.2f}"


def seeds(runs: list[Run]) -> str:
    return ",".join(str(s) for s in sorted({r.row["seed"] for r in runs}))


def gap(study: Study, runs: list[Run]) -> str:
    """The runs' mean val error minus the baseline's, in points (``-`` where either has no value)."""
    ref = [r.row["val_err"] for r in study.baseline() if not r.diverged]
    vals = [r.row["val_err"] for r in runs if not r.diverged]
    return f"{100 * (statistics.mean(vals) - statistics.mean(ref)):+.2f}" if vals and ref else "-"


def _ladders(studies: dict[str, Study]) -> dict[str, dict[int, list[Run]]]:
    """Each study's Figure 1 ladder, where it has more than one kn; empty unless two or more studies have one.

    Gaps are comparable only from baselines at the same kn: a study whose baseline is at a larger kn than
    the others' (e.g. a partial rerun that lacks the baseline runs) is left out of the comparison."""
    ladders = {name: lad for name, lad in ((n, s.ladder()) for n, s in studies.items()) if len(lad) > 1}
    if ladders:
        base = min(studies[name].base_kn for name in ladders)
        ladders = {name: lad for name, lad in ladders.items() if studies[name].base_kn == base}
    return ladders if len(ladders) > 1 else {}


def comparison(studies: dict[str, Study]) -> list[str]:
    """Figure 1 of several studies side by side (e.g. one schedule at two lengths): does the flat region move?"""
    ladders = _ladders(studies)
    if not ladders:
        return []
    out = ["## Figure 1 across studies: val error % (vs each study's baseline, points)", "",
           "| kn | " + " | ".join(ladders) + " |", "|---|" + "---|" * len(ladders)]
    for kn in sorted({kn for lad in ladders.values() for kn in lad}):
        cells = [f"{cell(lad[kn])} ({gap(studies[name], lad[kn])})" if kn in lad else "-"
                 for name, lad in ladders.items()]
        out.append(f"| {kn} | " + " | ".join(cells) + " |")
    return out + [""]


def device_pairs(runs: list[Run]) -> list[str]:
    """Markdown: each run (network, schedule, precision, setting and seed) done on more than one device, side by side.

    The same config and seed on a CPU and a GPU differ only in the order of floating-point sums, which
    training amplifies; the differences say how far a device moves a result, to set beside the seed spread.
    """
    keys = ("arch", "precision", "kn", "warmup", "rule", "base_lr", "zero_gamma", "seed", "epochs")
    groups: dict[tuple, dict[str, Run]] = defaultdict(dict)
    for r in runs:
        groups[(r.cfg["schedule"]["epochs"], *(r.row[k] for k in keys))][r.row["device"]] = r
    pairs = {key: by for key, by in sorted(groups.items()) if len(by) > 1}
    if not pairs:
        return []
    devices = sorted({d for by in pairs.values() for d in by}, key=lambda d: (d != "cpu", d))
    out = ["## The same runs on two devices: val error %", "",
           "| network | epochs | kn | warmup | rule | base lr | zero-gamma | seed | " + " | ".join(devices)
           + f" | {devices[-1]} - {devices[0]} (points) |", "|---" * (9 + len(devices)) + "|"]
    diffs = []
    for key, by in pairs.items():
        planned, arch, precision, kn, warmup, rule, base_lr, zg, seed, _ = key
        vals = [by[d].row["val_err"] if d in by and not by[d].diverged else None for d in devices]
        cells = ["diverged" if d in by and by[d].diverged else "-" if v is None else f"{100 * v:.2f}"
                 for d, v in zip(devices, vals)]
        diff = "-"
        if vals[0] is not None and vals[-1] is not None:
            diffs.append(100 * (vals[-1] - vals[0]))
            diff = f"{diffs[-1]:+.2f}"
        out.append(f"| {arch} {precision} | {planned} | {kn} | {warmup} | {rule} | {base_lr:g} | {zg} | {seed} | "
                   + " | ".join(cells) + f" | {diff} |")
    if diffs:
        out += ["", f"{len(diffs)} pairs: mean difference {statistics.mean(diffs):+.2f} points, mean absolute "
                f"{statistics.mean(abs(d) for d in diffs):.2f}, largest {max(diffs, key=abs):+.2f}"]
    return out + [""]


def tables(study: Study) -> list[str]:
    """Markdown: every setting, Table 1, the kn ladder (Fig. 1), Tables 2a and 2b."""
    out = ["All runs (val error %, median of the last 5 epochs; mean ± std over seeds)", "",
           "| kn | lr | warmup | rule | zero-gamma | epochs | steps | val error % | last epoch: train / val error % "
           "| seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in study.runs:
        x = r.row
        groups[(x["kn"], x["lr"], x["warmup"], x["rule"], str(x["zero_gamma"]), x["epochs"])].append(r)
    for (kn, lr, warmup, rule, zg, ep), rs in sorted(groups.items()):
        steps = max(r.row["steps"] for r in rs)
        out.append(f"| {kn} | {lr:.3g} | {warmup} | {rule} | {zg} | {ep} | {steps} | {cell(rs)} | {last(rs)} "
                   f"| {seeds(rs)} |")
    out += recipe_tables(study)
    for name, variant in study.variants.items():
        out += recipe_tables(variant, f" ({name})")
    out += setting_tables(study)
    return out


def recipe_tables(study: Study, recipe: str = "") -> list[str]:
    """Markdown: Table 1 and the kn ladder (Fig. 1) of the study's recipe, ``recipe`` naming a variant's."""
    out: list[str] = []
    base = study.baseline()
    if study.warmup_kns:
        out += ["", f"Table 1{recipe}: warmup at the large kn", "", "| setting | kn | lr | val error % | seeds |",
                "|---|---|---|---|---|"]
        out.append(f"| baseline | {study.base_kn} | {base[0].row['lr']:.3g} | {cell(base)} | {seeds(base)} |")
        for kn in study.warmup_kns:
            for mode in ("none", "constant", "gradual"):
                rs = study.recipe(kn=kn, warmup=mode)
                if rs:
                    out.append(f"| {mode} warmup | {kn} | {rs[0].row['lr']:.3g} | {cell(rs)} | {seeds(rs)} |")
    ladder = study.ladder()
    if len(ladder) > 1:
        out += ["", f"Figure 1{recipe}: val error against kn (gradual warmup)", "",
                "| kn | lr | steps | val error % | vs baseline (points) | seeds |", "|---|---|---|---|---|---|"]
        for kn, rs in ladder.items():
            steps = max(r.row["steps"] for r in rs)
            out.append(f"| {kn} | {rs[0].row['lr']:.3g} | {steps} | {cell(rs)} | {gap(study, rs)} | {seeds(rs)} |")
    return out


def setting_tables(study: Study) -> list[str]:
    """Markdown: Tables 2a (the rate rule, the base rate) and 2b (zero-gamma), at every kn that varies them."""
    out: list[str] = []
    for title, keys in (("Table 2a: the rate rule", ("rule", "base_lr")), ("Table 2b: zero-gamma", ("zero_gamma",))):
        others = {k: v for k, v in study.default.items() if k not in keys}

        def setting(values: dict[str, Any], keys: tuple[str, ...] = keys) -> tuple[str, ...]:
            return tuple(str(values[k]) for k in keys)

        recipe = setting(study.default)
        for kn in sorted({r.row["kn"] for r in study.runs}):
            rs = [r for r in study.select(kn=kn, **others)  # gradual warmup; at the baseline's kn it is flat
                  if r.row["warmup"] == "gradual" or kn == study.base_kn]
            values = sorted({setting(r.row) for r in rs})
            if len(values) > 1:
                head = "| rule | base lr (per ref. batch) |" if len(keys) > 1 else "| zero_gamma |"
                out += ["", f"{title} at kn = {kn}", "", f"{head} lr | val error % | vs baseline (points) | seeds |",
                        "|---" * (len(keys) + 4) + "|"]
                for v in values:
                    sub = [r for r in rs if setting(r.row) == v]
                    name = " | ".join(v) + (" (the recipe)" if v == recipe else "")
                    out.append(f"| {name} | {sub[0].row['lr']:.3g} | {cell(sub)} | {gap(study, sub)} | {seeds(sub)} |")
    return out


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
            vals = [r.row["val_err"] for r in rs if not r.diverged and r.row["val_err"] is not None]
            return statistics.mean(vals) if vals else math.inf

        out: dict[str, dict[int, list[Run]]] = defaultdict(dict)
        for (method, kn, _), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], score(kv[1]))):
            out[method].setdefault(kn, rs)  # sorted by score: the first is the best
        return {m: dict(sorted(by_kn.items())) for m, by_kn in sorted(out.items())}

    def recipe_at_epoch(self, run: Run, epoch: int) -> float | None:
        """The val error of the recipe's run of ``run``'s kn and seed at ``epoch`` (to set a probe beside)."""
        if self.reference is None:
            return None
        for r in self.reference.recipe(kn=run.row["kn"], seed=run.row["seed"], warmup=run.row["warmup"]):
            for e in r.epochs:
                if e["epoch"] == epoch:
                    return e["val/err"]
        return None


def setting_label(runs: list[Run]) -> str:
    x = runs[0].row
    return f"lr {x['lr']:.3g}, {x['warmup']} warmup {x['warmup_epochs']:g} ep"


def beyond_tables(methods: Methods) -> list[str]:
    """Markdown: every run beyond the recipe (a probe beside the recipe at its last epoch), then Figure 1
    (methods): the recipe's ladder and each method's best setting at each kn, as gaps from the baseline."""
    ref = methods.reference
    base = ref.baseline() if ref else []
    zg = methods.runs[0].row["zero_gamma"]
    out = ["", "## Beyond the paper: other methods at large kn", "",
           f"Runs of the study beyond its recipe; gaps are from the recipe's baseline (kn {ref.base_kn if ref else '-'}, "
           f"{cell(base)} %, zero-gamma {zg}). A run stopped before its planned epochs (a probe, "
           "`checkpoint.stop_after_epoch`, or a run not finished yet) shows its last epoch's val error beside the "
           "recipe's run of the same kn and seed at that epoch.", "",
           "| method | kn | lr | warmup | epochs | val error % | vs baseline (points) | last epoch: train / val error % "
           "| seeds |", "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in methods.runs:
        x = r.row
        groups[(methods.method(r), x["kn"], x["lr"], x["warmup"], x["warmup_epochs"], finished(r), x["epochs"])].append(r)
    for (method, kn, lr, warmup, w_ep, done, ep), rs in sorted(groups.items()):
        planned = rs[0].row["planned_epochs"]
        if done:
            value, vs = cell(rs), gap(ref, rs) if ref else "-"
            epochs = str(ep)
        else:  # a probe: the last epoch, beside the recipe at the same epoch
            value = f"{100 * statistics.mean(r.epochs[-1]['val/err'] for r in rs):.2f} (epoch {ep})"
            ref_vals = [v for v in (methods.recipe_at_epoch(r, ep) for r in rs) if v is not None]
            vs = f"recipe at epoch {ep}: {100 * statistics.mean(ref_vals):.2f}" if ref_vals else "-"
            probe = any((r.cfg.get("checkpoint") or {}).get("stop_after_epoch") for r in rs)
            epochs = f"{ep} of {planned} ({'probe' if probe else 'unfinished'})"
        out.append(f"| {method} | {kn} | {lr:.3g} | {warmup} {w_ep:g} ep | {epochs} | {value} | {vs} | {last(rs)} "
                   f"| {seeds(rs)} |")
    best = methods.best()
    if ref is None or not best:
        return out
    ladder = ref.ladder()
    kns = sorted(set(ladder) | {kn for by_kn in best.values() for kn in by_kn})
    out += ["", "Figure 1 (methods): val error % (vs the baseline, points) of the recipe and each method's best "
            "finished setting", "", "| kn | recipe (SGD, step decay, warmup "
            f"{methods.paper_warmup:g} ep) | " + " | ".join(best) + " |", "|---|---|" + "---|" * len(best)]
    for kn in kns:
        cells = [f"{cell(ladder[kn])} ({gap(ref, ladder[kn])})" if kn in ladder else "-"]
        for by_kn in best.values():
            rs = by_kn.get(kn)
            cells.append(f"{cell(rs)} ({gap(ref, rs)}; {setting_label(rs)}; seeds {seeds(rs)})" if rs else "-")
        out.append(f"| {kn} | " + " | ".join(cells) + " |")
    return out


def write_summary(runs: list[Run], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(r.row for r in runs)


# --------------------------------------------------------------------------- figures


def curve(ax: Any, run: Run, key: str, **kw: Any) -> None:
    """One run's per-epoch ``key`` (an error) in percent against epochs."""
    ax.plot([e["epoch"] for e in run.epochs], [100 * e[key] for e in run.epochs], **kw)


def label(run: Run) -> str:
    x = run.row
    return f"kn={x['kn']}, lr={x['lr']:.3g}" + (", diverged" if run.diverged else "")


def ladder_points(ladder: dict[int, list[Run]]) -> tuple[list[int], list[float], list[float], list[int]]:
    """Figure 1's points: kn, mean and std of the val error (%) over seeds, and the kn where a run diverged."""
    kns, means, stds, div = [], [], [], []
    for kn, rs in ladder.items():
        vals = [100 * r.row["val_err"] for r in rs if not r.diverged]
        if vals:
            kns.append(kn)
            means.append(statistics.mean(vals))
            stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
        if any(r.diverged for r in rs):
            div.append(kn)
    return kns, means, stds, div


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError("the figures need matplotlib: pip install 'lbsgd[plots]' (tables were written)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def label_clipped(ax: Any, labels: list[tuple[float, float, str, str]], fontsize: float = 8) -> list[Any]:
    """Write the value of each point drawn at the edge of a figure (``(x, y drawn, text, colour)``) beside
    its marker: to its left, about at the marker's height (inside the axes), in its line's colour. A line
    reaching the edge rises to it from below, so that side is clear of every line (below the marker, where
    the labels used to be, are the line itself and the other methods' markers). Several labels at one point
    sit side by side, right to left, each clear of the last. Returns the annotations."""
    at: dict[tuple[float, float], list[tuple[str, str]]] = {}
    for x, y, text, color in labels:
        at.setdefault((x, y), []).append((text, color))
    written = []
    for (x, y), texts in at.items():
        dx = -12.0  # points left of the marker's centre: past it, and past where a shallow line meets it
        for text, color in texts:
            written.append(ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, 1.5), ha="right",
                                       va="center", fontsize=fontsize, color=color))
            dx -= 0.62 * fontsize * len(text) + 4  # a digit is about 0.6 em wide; 4 points between labels
    return written


def comparison_figure(studies: dict[str, Study], out: Path) -> list[Path]:
    """Figure 1 with one line per study (``fig1_err_vs_kn_studies.png``), where two or more have a ladder."""
    ladders = _ladders(studies)
    if not ladders:
        return []
    plt = _pyplot()
    top = 15.0  # points above the baseline; a run beyond is drawn at the edge with its value written
    fig, ax = plt.subplots(figsize=(6, 4))
    clipped: list[tuple[float, float, str, str]] = []
    for name, lad in ladders.items():
        kns, means, stds, _ = ladder_points(lad)
        ref = means[0] if kns and kns[0] == studies[name].base_kn else None
        if ref is None:
            continue
        gaps = [m - ref for m in means]
        line = ax.errorbar(kns, [min(g, top) for g in gaps], yerr=stds, fmt="o-", capsize=3,
                           label=f"{name} (baseline {ref:.2f} %)")
        clipped += [(kn, top, f"+{g:.1f}", line[0].get_color()) for kn, g in zip(kns, gaps) if g > top]
    label_clipped(ax, clipped)
    ax.axhline(1.0, color="grey", ls="--", lw=0.8, label="1 point above the baseline")
    ax.set_xscale("log", base=2)
    ax.set_ylim(top=top + 0.5)
    ax.set(xlabel="minibatch size kn", ylabel="val error - baseline's (points)",
           title="error vs minibatch size, per study (Fig. 1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fig1_err_vs_kn_studies.png", dpi=110)
    plt.close(fig)
    return [out / "fig1_err_vs_kn_studies.png"]


def methods_figure(methods: Methods, out: Path) -> list[Path]:
    """Figure 1 (methods), ``fig1_methods.png``: the recipe's ladder and each method's best finished setting
    per kn, val error against kn, with the baseline and 1 point above it marked."""
    best, ref = methods.best(), methods.reference
    if ref is None or not best:
        return []
    plt = _pyplot()
    base = [100 * r.row["val_err"] for r in ref.baseline() if not r.diverged]
    ref_err = statistics.mean(base) if base else None
    top = (ref_err or 0) + 25.0  # a point beyond is drawn at the edge with its value written
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    clipped: list[tuple[float, float, str, str]] = []

    def draw(ladder: dict[int, list[Run]], name: str, fmt: str) -> None:
        kns, means, stds, div = ladder_points(ladder)
        line = ax.errorbar(kns, [min(m, top) for m in means], yerr=stds, fmt=fmt, capsize=3, label=name)
        clipped.extend((kn, top, f"{m:.1f}", line[0].get_color()) for kn, m in zip(kns, means) if m > top)
        for kn in div:
            ax.annotate("diverged", (kn, top), rotation=90, ha="center", va="top", fontsize=8)

    draw(ref.ladder(), f"recipe: SGD, step decay, warmup {methods.paper_warmup:g} ep", "o-")
    for method, by_kn in best.items():
        draw(by_kn, f"{method} (best setting per kn)", "s--")
    label_clipped(ax, clipped)
    if ref_err is not None:
        ax.axhline(ref_err + 1.0, color="grey", ls="--", lw=0.8, label="1 point above the baseline")
    ax.set_xscale("log", base=2)
    ax.set_ylim(top=top + 1)
    ax.set(xlabel="minibatch size kn", ylabel="val error (%)", title="beyond the paper: error vs kn per method")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "fig1_methods.png", dpi=110)
    plt.close(fig)
    return [out / "fig1_methods.png"]


def figures(study: Study, out: Path) -> list[Path]:
    """Figures 1-4 of the paper as PNGs (needs matplotlib)."""
    plt = _pyplot()

    written = []
    base = [r for r in study.baseline() if not r.diverged]
    first = min(r.row["seed"] for r in study.runs)

    def save(fig, name: str) -> None:
        out.mkdir(exist_ok=True)  # here, not before: a study with nothing to draw leaves no empty folder
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    ladder = study.ladder()
    if len(ladder) > 1:  # Figure 1
        fig, ax = plt.subplots(figsize=(6, 4))
        kns, means, stds, div = ladder_points(ladder)
        ax.errorbar(kns, means, yerr=stds, fmt="o-", capsize=3)
        for kn in div:
            ax.annotate("diverged", (kn, max(means or [100])), rotation=90, ha="center", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="minibatch size kn", ylabel="val error (%)", title="error vs minibatch size (Fig. 1)")
        save(fig, "fig1_err_vs_kn.png")
        cols = min(4, len(ladder))
        rows = (len(ladder) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), sharey=True, squeeze=False)
        for ax, (kn, rs) in zip(axes.flat, ladder.items()):  # Figure 3
            if base:
                curve(ax, base[0], "train/err", color="black", lw=1.0, label=f"{label(base[0])} (baseline)")
            run = min(rs, key=lambda r: r.row["seed"])
            curve(ax, run, "train/err", label=label(run))
            ax.set_title(f"kn = {kn}")
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(ladder):]:
            ax.axis("off")
        fig.supxlabel("epochs")
        fig.supylabel("training error (%)")
        save(fig, "fig3_kn_curves.png")
    if study.warmup_kns:  # Figure 2: a row of the three warmups per kn that has them
        rows = len(study.warmup_kns)
        fig, axes = plt.subplots(rows, 3, figsize=(15, 4 * rows), sharey=True, squeeze=False)
        for row, kn in zip(axes, study.warmup_kns):
            for ax, mode in zip(row, ("none", "constant", "gradual")):
                if base:
                    curve(ax, base[0], "train/err", color="black", lw=1.2, label=f"{label(base[0])} (baseline)")
                for r in study.recipe(kn=kn, warmup=mode, seed=first):
                    curve(ax, r, "train/err", label=f"{label(r)}, {mode} warmup")
                ax.set(title=f"kn = {kn}, {mode} warmup", xlabel="epochs")
                ax.legend(fontsize=8)
            row[0].set_ylabel("training error (%)")
        save(fig, "fig2_warmup.png")
        large = study.recipe(kn=study.large_kn, warmup="gradual", seed=first)
        if base and large:  # Figure 4
            fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
            for ax, key, name in ((axes[0], "train/err", "training error"), (axes[1], "val/err", "validation error")):
                curve(ax, base[0], key, color="black", label=f"{label(base[0])} (baseline)")
                curve(ax, large[0], key, label=f"{label(large[0])}, gradual warmup")
                ax.set(title=name, xlabel="epochs")
                ax.legend(fontsize=8)
            axes[0].set_ylabel("error (%)")
            save(fig, "fig4_train_val.png")
    return written


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lbsgd plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="run directories or folders holding them (sweeps)")
    ap.add_argument("--out", type=Path, default=Path("plots"), help="where the tables and figures go (default plots/)")
    ap.add_argument("--no-figures", action="store_true", help="tables and summary.csv only (no matplotlib needed)")
    args = ap.parse_args(argv)
    runs = find_runs(args.paths)
    args.out.mkdir(parents=True, exist_ok=True)
    write_summary(runs, args.out / "summary.csv")
    studies: dict[str, Study] = {}
    methods: dict[str, Methods] = {}  # runs beyond the paper (results/beyond.md), per study
    for name, members in split_studies(runs).items():
        paper, beyond = split_methods(members)
        if paper:
            studies[name] = Study.of(paper)
        if beyond:
            methods[name] = Methods.of(paper, beyond)
    variants = {f"{name}_{v}": vs for name, study in studies.items() for v, vs in study.variants.items()}
    every = {**studies, **variants}  # the variants' tables are in their study's; their figures are their own
    several = len(studies.keys() | methods.keys()) > 1
    lines: list[str] = comparison(every) + device_pairs(runs)
    for name in sorted(studies.keys() | methods.keys()):
        if several:  # several networks or schedules: one set of tables and figures each
            lines += [f"## {name}", ""]
        lines += (tables(studies[name]) if name in studies else []) + (
            beyond_tables(methods[name]) if name in methods else []) + [""]
    (args.out / "tables.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out / 'summary.csv'} ({len(runs)} runs), {args.out / 'tables.md'}", file=sys.stderr)
    if not args.no_figures:
        written = comparison_figure(every, args.out)
        for name, study in every.items():
            out = args.out / name if several or name in variants else args.out
            written += figures(study, out)
        for name, m in methods.items():
            written += methods_figure(m, args.out / name if several else args.out)
        for p in written:
            print(f"wrote {p}", file=sys.stderr)
    return 0


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
