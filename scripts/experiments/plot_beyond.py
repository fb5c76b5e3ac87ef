#!/usr/bin/env python
"""Figures and table of results/starved_5k/beyond.md, from the run directories of scripts/experiments/exp_beyond.sh starved.

    python scripts/experiments/plot_beyond.py runs/results --out results/starved_5k

Reads ``<runs>/kn_sweep`` and ``<runs>/warmup`` (plain SGD, seed 0), ``<runs>/lars`` (LARS),
``<runs>/noise_scale`` (the baseline with ``log.noise_scale=true``) and ``<runs>/comm_hook/<hook>``
(2 processes); writes ``fig5_beyond.png`` (val error against ``kn`` for SGD and LARS with the
measured noise scale marked; the noise scale over training) and ``beyond_tables.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from lbsgd_cli.report.runs import Run, load_run, peak_lr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recommend_kn import recommend  # noqa: E402


def runs_under(root: Path) -> list[Run]:
    found = [load_run(d) for d in sorted(root.iterdir()) if (d / "config.yaml").exists()] if root.is_dir() else []
    return [r for r in found if r is not None]


def sgd_ladder(runs_root: Path) -> dict[int, float]:
    """val error by kn of plain SGD, gradual warmup, zero-gamma, seed 0 (kn sweep + warmup runs)."""
    out = {}
    for exp in ("kn_sweep", "warmup"):
        for run in runs_under(runs_root / exp):
            row = run.row
            if row["seed"] == 0 and (row["warmup"] == "gradual" or exp == "kn_sweep" or row["kn"] == 64):
                if run.cfg["optim"].get("name", "sgd") == "sgd" and row["rule"] == "linear":
                    out.setdefault(row["kn"], row["val_err"])
    return dict(sorted(out.items()))


def noise_scale_curve(run: Run) -> tuple[list[float], list[float]]:
    """(iterations, B_simple) of the run's per-iteration records."""
    recs = [r for r in run.records if r.get("train/noise_scale") is not None]
    return [r["iter"] for r in recs], [r["train/noise_scale"] for r in recs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path)
    p.add_argument("--out", type=Path, default=Path("results"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    sgd = sgd_ladder(args.runs)
    lars: dict[str, dict[int, tuple[float, float]]] = {"linear": {}, "sqrt": {}}  # rule -> kn -> (err, lr)
    for r in runs_under(args.runs / "lars"):
        row = r.row
        for rule in lars:  # at kn = ref_batch every rule gives the same rate: the run serves both series
            if row["rule"] == rule or peak_lr(r.cfg) == r.cfg["optim"]["base_lr"]:
                lars[rule][row["kn"]] = (row["val_err"], peak_lr(r.cfg))
    noise_runs = runs_under(args.runs / "noise_scale")
    iters, bs = noise_scale_curve(noise_runs[0]) if noise_runs else ([], [])
    rec = recommend(noise_runs[0].path) if noise_runs else None  # the same median as scripts/experiments/recommend_kn.py
    b_simple = rec["b_simple"] if rec else None
    hooks = {}
    for hook_dir in sorted((args.runs / "comm_hook").glob("*")):
        run = load_run(hook_dir)
        if run is not None:
            hooks[hook_dir.name] = run.row["val_err"]

    lines = ["| kn | SGD (linear rule) val error % | LARS, linear rule: val error % (lr) | LARS, sqrt rule: val error % (lr) |",
             "|---|---|---|---|"]

    def cell(series: dict[int, tuple[float, float]], kn: int) -> str:
        return f"{100 * series[kn][0]:.2f} ({series[kn][1]:.3g})" if kn in series else "-"

    for kn in sorted(set(sgd) | set(lars["linear"]) | set(lars["sqrt"])):
        sg = f"{100 * sgd[kn]:.2f}" if kn in sgd else "-"
        lines.append(f"| {kn} | {sg} | {cell(lars['linear'], kn)} | {cell(lars['sqrt'], kn)} |")
    if rec is not None:
        lines += ["", f"Noise scale of the baseline (median after epoch {rec['after_epoch']:g}): "
                      f"B_simple = {rec['b_simple']:.0f}; recommended largest kn: {rec['recommended_kn']}"]
    if hooks:
        lines += ["", "| allreduce (2 processes) | val error % |", "|---|---|"]
        lines += [f"| {h} | {100 * e:.2f} |" for h, e in hooks.items()]
    (args.out / "beyond_tables.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    a.plot(list(sgd), [100 * v for v in sgd.values()], "o-", color="black", label="SGD, linear rule")
    for rule, style in (("linear", "s--"), ("sqrt", "s-")):
        ks = sorted(lars[rule])
        if ks:
            a.plot(ks, [100 * lars[rule][k][0] for k in ks], style, color="tab:red", label=f"LARS, {rule} rule")
    if b_simple is not None:
        a.axvline(b_simple, ls="--", color="tab:blue", label=f"measured B_simple = {b_simple:.0f}")
    a.set_xscale("log", base=2)
    a.set_xlabel("minibatch size kn")
    a.set_ylabel("val error (%)")
    a.set_title("error vs kn: SGD, LARS, noise scale")
    a.legend()
    if bs:
        b.plot(iters, bs, color="tab:blue")
        b.set_yscale("log")
        b.set_xlabel("iterations (baseline run)")
        b.set_ylabel("B_simple (EMA)")
        b.set_title("gradient noise scale during training")
    fig.tight_layout()
    fig.savefig(args.out / "fig5_beyond.png", dpi=110)
    print(f"wrote {args.out / 'fig5_beyond.png'} and {args.out / 'beyond_tables.md'}")


if __name__ == "__main__":
    main()
