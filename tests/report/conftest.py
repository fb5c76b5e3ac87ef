"""Run directories as ``lbsgd train`` writes them, made on the fly for the tests of :mod:`lbsgd_cli.report`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml


def make_run(root: Path, name: str, k: int, warmup: str = "gradual", seed: int = 0, rule: str = "linear",
             zero_gamma: bool = True, errs: tuple[float, ...] = (0.5, 0.4, 0.3), diverged: bool = False,
             epochs: int = 3, precision: str = "bf16", base_lr: float = 0.1, device: str | None = None,
             optim: str | None = None, decay: str | None = None, warmup_epochs: float | None = None,
             shortcut: str | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    cfg = {"batch": {"k": k, "n": 32}, "optim": {"base_lr": base_lr, "ref_batch": 128, "lr_rule": rule},
           "schedule": {"warmup": warmup, "epochs": epochs}, "model": {"arch": "cifar_resnet", "depth": 8,
                                                      "zero_init_residual": zero_gamma},
           "seed": seed, "precision": precision}
    for group, key, value in (("optim", "name", optim), ("schedule", "decay", decay),
                              ("schedule", "warmup_epochs", warmup_epochs), ("model", "shortcut", shortcut)):
        if value is not None:  # runs from before these keys existed have none
            cfg[group][key] = value
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = []
    for e, err in enumerate(errs, 1):
        lines.append({"step": 10 * e, "iter": 10 * e, "lr": 0.1, "train/loss": 1.0})
        lines.append({"step": 10 * e, "epoch": e, "train/err": err + 0.01, "val/err": err, "val/loss": 1.0})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = {"diverged": diverged} if diverged else {"val_top1_err": errs[-1]}
    if diverged:
        summary["diverged_at_iteration"] = 7
    (d / "summary.json").write_text(json.dumps(summary))
    if device is not None:  # as lbsgd train writes it: one entry per start (a resume adds one)
        (d / "run_info.json").write_text(json.dumps({"starts": [{"device": device, "seed": seed}]}))
    return d


@pytest.fixture
def study_dir(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    make_run(root, "base-s0", 4, "none", 0, errs=(0.9, 0.21, 0.20))
    make_run(root, "base-s1", 4, "none", 1, errs=(0.9, 0.23, 0.22))
    for mode in ("none", "constant", "gradual"):
        make_run(root, f"large-{mode}", 64, mode, 0, errs=(0.9, 0.30, 0.25) if mode == "gradual" else (0.9, 0.35, 0.3),
                 diverged=mode == "none")
    make_run(root, "ladder-16", 16, errs=(0.5, 0.3, 0.21))
    make_run(root, "ladder-16-none", 16, "none", 0, errs=(0.5, 0.33, 0.23))  # a second kn with two warmups
    make_run(root, "sqrt", 64, rule="sqrt", errs=(0.6, 0.5, 0.35))
    make_run(root, "nozg", 64, zero_gamma=False, errs=(0.6, 0.5, 0.27))
    return root
