#!/usr/bin/env python
"""Regenerate the paper's figures and results/summary.csv from run directories alone.

    python scripts/plot_results.py RUNS_ROOT [--out results]

RUNS_ROOT holds one folder per experiment (``warmup``, ``kn_sweep``, ``lr_rule``,
``zero_gamma``), each holding run directories written by ``lbsgd train`` (a
``config.yaml`` and a ``metrics.jsonl``). Nothing else is read. Writes:

- ``summary.csv``: one row per run, ``experiment,kn,k,n,lr,warmup,zero_gamma,seed,epochs,val_err,train_err``
  (errors as fractions; ``val_err`` is the median of the last 5 epochs' val error, as in the paper);
- ``fig2_warmup.png``: training error vs epochs for no/constant/gradual warmup at the large kn, against the baseline;
- ``fig1_err_vs_kn.png`` and ``fig3_kn_curves.png``: val error vs kn (log axis) and each kn's training curve
  against the baseline;
- ``fig4_train_val.png``: train and val error curves, large kn vs the baseline;
- ``tables.md``: Table 1, the kn sweep and Tables 2a/2b as markdown (also printed).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

import yaml

EXPERIMENTS = ("warmup", "kn_sweep", "lr_rule", "zero_gamma")
FIELDS = ["experiment", "kn", "k", "n", "lr", "warmup", "zero_gamma", "seed", "epochs", "val_err", "train_err"]


def peak_lr(cfg: dict) -> float:
    o, b = cfg["optim"], cfg["batch"]
    ratio = b["k"] * b["n"] / o["ref_batch"]
    return o["base_lr"] * {"linear": ratio, "sqrt": ratio**0.5, "none": 1.0}[o["lr_rule"]]


def load_run(run_dir: Path) -> dict | None:
    cfg_path, met_path = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not (cfg_path.exists() and met_path.exists()):
        return None
    cfg = yaml.safe_load(cfg_path.read_text())
    records = []
    for line in met_path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    epochs = [r for r in records if "val/err" in r]
    if not epochs:
        return None
    return {"dir": run_dir, "cfg": cfg, "epochs": epochs, "iters": [r for r in records if "lr" in r]}


def summarise(experiment: str, run: dict) -> dict:
    cfg, ep = run["cfg"], run["epochs"]
    last5 = sorted(r["val/err"] for r in ep[-5:])
    return {
        "experiment": experiment,
        "kn": cfg["batch"]["k"] * cfg["batch"]["n"],
        "k": cfg["batch"]["k"],
        "n": cfg["batch"]["n"],
        "lr": round(peak_lr(cfg), 6),
        "warmup": cfg["schedule"]["warmup"],
        "zero_gamma": cfg["model"]["zero_init_residual"],
        "seed": cfg["seed"],
        "epochs": len(ep),
        "val_err": round(last5[len(last5) // 2], 5),
        "train_err": round(ep[-1]["train/err"], 5),
        "rule": cfg["optim"]["lr_rule"],
    }


def label(row: dict) -> str:
    return f"kn={row['kn']}, lr={row['lr']:.3g}"


def curve(run: dict, key: str) -> tuple[list[float], list[float]]:
    return [r["epoch"] for r in run["epochs"]], [100 * r[key] for r in run["epochs"]]


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--out", type=Path, default=Path("results"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def emit(text: str) -> None:
        print(text)
        lines.append(text)
    runs: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    for exp in EXPERIMENTS:
        for d in sorted((args.root / exp).glob("*")):
            run = load_run(d)
            if run is not None:
                runs[exp].append((summarise(exp, run), run))
    rows = [row for exp in EXPERIMENTS for row, _ in runs[exp]]
    with open(args.out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out / 'summary.csv'} ({len(rows)} runs)")

    # the baseline: the smallest kn of the warmup experiment
    warm = runs["warmup"]
    base_kn = min((r["kn"] for r, _ in warm), default=None)
    baseline = [(r, run) for r, run in warm if r["kn"] == base_kn]

    def plot_baseline(ax, key="train/err"):
        if baseline:
            r, run = baseline[0]
            ax.plot(*curve(run, key), color="black", lw=1.2, label=f"{label(r)} (baseline)")

    if warm:  # Figure 2 and Table 1
        fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
        for ax, mode in zip(axes, ("none", "constant", "gradual")):
            plot_baseline(ax)
            for r, run in warm:
                if r["kn"] != base_kn and r["warmup"] == mode and r["seed"] == min(x["seed"] for x, _ in warm):
                    ax.plot(*curve(run, "train/err"), label=f"{label(r)}, {mode} warmup")
            ax.set_title(f"{mode} warmup")
            ax.set_xlabel("epochs")
            ax.legend(fontsize=8)
        axes[0].set_ylabel("training error (%)")
        fig.tight_layout()
        fig.savefig(args.out / "fig2_warmup.png", dpi=110)
        emit("\n| setting | kn | lr | val error % (median of last 5 epochs; mean ± std over seeds) | seeds |")
        emit("|---|---|---|---|---|")
        groups = defaultdict(list)
        for r, _ in warm:
            groups[(r["kn"], r["lr"], "baseline" if r["kn"] == base_kn else r["warmup"])].append(r["val_err"])
        for (kn, lr, name), vals in sorted(groups.items()):
            emit(f"| {name} | {kn} | {lr:.3g} | {mean_std(vals)} | {len(vals)} |")

    # runs shared between experiments: the warmup experiment's baseline and gradual runs (first seed)
    # are also points of the kn sweep, the linear rule of Table 2a and zero-gamma "on" of Table 2b
    seed0 = min((r["seed"] for r, _ in warm), default=0)
    shared = [(r, run) for r, run in warm if r["seed"] == seed0 and (r["kn"] == base_kn or r["warmup"] == "gradual")]
    large_gradual = [(r, run) for r, run in shared if r["kn"] != base_kn]
    sweep = sorted(runs["kn_sweep"] + shared, key=lambda t: t[0]["kn"])
    if sweep:  # Figures 1 and 3
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["kn"] for r, _ in sweep], [100 * r["val_err"] for r, _ in sweep], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("minibatch size kn")
        ax.set_ylabel("val error (%)")
        ax.set_title("error vs minibatch size (Fig. 1)")
        fig.tight_layout()
        fig.savefig(args.out / "fig1_err_vs_kn.png", dpi=110)
        cols = 4
        rows_n = (len(sweep) + cols - 1) // cols
        fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.2 * rows_n), sharey=True, squeeze=False)
        ref = [t for t in sweep if t[0]["kn"] == base_kn] or baseline
        for ax, (r, run) in zip(axes.flat, sweep):
            if ref:
                ax.plot(*curve(ref[0][1], "train/err"), color="black", lw=1.0, label=f"{label(ref[0][0])}")
            ax.plot(*curve(run, "train/err"), label=label(r))
            ax.set_title(f"kn = {r['kn']}")
            ax.legend(fontsize=7)
        for ax in axes.flat[len(sweep):]:
            ax.axis("off")
        fig.supxlabel("epochs")
        fig.supylabel("training error (%)")
        fig.tight_layout()
        fig.savefig(args.out / "fig3_kn_curves.png", dpi=110)
        emit("\n| kn | lr | val error % | train error % |\n|---|---|---|---|")
        for r, _ in sweep:
            emit(f"| {r['kn']} | {r['lr']:.3g} | {100 * r['val_err']:.2f} | {100 * r['train_err']:.2f} |")

    large = [(r, run) for r, run in warm if r["kn"] != base_kn and r["warmup"] == "gradual"]
    if baseline and large:  # Figure 4
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, key, name in ((axes[0], "train/err", "training error"), (axes[1], "val/err", "validation error")):
            ax.plot(*curve(baseline[0][1], key), color="black", label=f"{label(baseline[0][0])} (baseline)")
            ax.plot(*curve(large[0][1], key), label=f"{label(large[0][0])}, gradual warmup")
            ax.set_title(name)
            ax.set_xlabel("epochs")
            ax.legend(fontsize=8)
        axes[0].set_ylabel("error (%)")
        fig.tight_layout()
        fig.savefig(args.out / "fig4_train_val.png", dpi=110)

    for exp, key, title in (("lr_rule", "rule", "Table 2a"), ("zero_gamma", "zero_gamma", "Table 2b")):
        if runs[exp]:
            emit(f"\n{title}\n| kn | {key} | lr | val error % |\n|---|---|---|---|")
            for r, _ in sorted(runs[exp] + large_gradual, key=lambda t: (t[0]["kn"], str(t[0][key]))):
                emit(f"| {r['kn']} | {r[key]} | {r['lr']:.3g} | {100 * r['val_err']:.2f} |")


    (args.out / "tables.md").write_text("\n".join(lines).lstrip() + "\n")
    print(f"wrote {args.out / 'tables.md'}")


if __name__ == "__main__":
    main()
