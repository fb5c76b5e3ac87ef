"""The runs ``lbsgd plot`` reads, and ``summary.csv``: one row per run.

Every folder that holds a ``config.yaml`` and a ``metrics.jsonl`` (written by ``lbsgd train``) is one run;
``summary.json`` adds whether it diverged and ``run_info.json`` the device it ran on. Nothing else is read.
A run's error is the median val error of its last 5 epochs (the paper's metric, §5.1 footnote) and its rate
the peak rate after warmup (§2.1); a diverged run has no error, only the iteration it diverged at.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import rules
from ..choices import LRRule
from ..errors import UserError
from ..metrics import read_metrics

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
        "arch": network(cfg["model"]),
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


def network(model: dict[str, Any]) -> str:
    """The network as studies tell it apart: ``model.arch``, with a CIFAR ResNet's depth (``cifar_resnet-8``) and,
    for He et al.'s projection shortcuts (``model.shortcut=B``, He et al. 2016 §3.3), ``-shortcutB``. Option A,
    the default and the only one before the key existed, adds nothing."""
    if model["arch"] != "cifar_resnet":
        return model["arch"]
    shortcut = str(model.get("shortcut", "A"))
    return f"cifar_resnet-{model['depth']}" + ("" if shortcut == "A" else f"-shortcut{shortcut}")


def run_device(run_info: Path) -> str:
    """The device type a run trained on (``cpu``, ``cuda``), from its ``run_info.json``; ``unknown`` without one.

    A run resumed on another device type is ``cpu+cuda``: neither study's, so a study of its own."""
    try:
        starts = json.loads(run_info.read_text())["starts"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"
    kinds = sorted({str(s.get("device", "unknown")).split(":")[0] for s in starts}) or ["unknown"]
    return "+".join(kinds)


def write_summary(runs: list[Run], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(r.row for r in runs)