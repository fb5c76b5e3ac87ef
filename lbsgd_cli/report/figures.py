"""The paper's Figures 1-4 as PNGs, Figure 1 across studies and Figure 1 of the methods beyond the paper
(matplotlib: ``pip install 'lbsgd[plots]'``)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ..errors import UserError
from .runs import Run
from .studies import Methods, Study, comparable_ladders, mean_val_err

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
    ladders = comparable_ladders(studies)
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

    def draw(ladder: dict[int, list[Run]], name: str, fmt: str) -> str:
        kns, means, stds, div = ladder_points(ladder)
        line = ax.errorbar(kns, [min(m, top) for m in means], yerr=stds, fmt=fmt, capsize=3, label=name)
        clipped.extend((kn, top, f"{m:.1f}", line[0].get_color()) for kn, m in zip(kns, means) if m > top)
        for kn in div:
            ax.annotate("diverged", (kn, top), rotation=90, ha="center", va="top", fontsize=8)
        return line[0].get_color()

    draw(ref.ladder(), f"recipe: SGD, step decay, warmup {methods.paper_warmup:g} ep", "o-")
    own = methods.own_baselines()
    for method, by_kn in best.items():
        color = draw(by_kn, f"{method} (best setting per kn)", "s--")
        own_err = mean_val_err(own.get(method, []))
        if own_err is not None:  # the schedule's own baseline: its flat region is measured from it
            ax.axhline(100 * own_err + 1.0, color=color, ls=":", lw=0.9,
                       label=f"1 point above {method}'s own baseline (kn {ref.base_kn})")
    label_clipped(ax, clipped)
    if ref_err is not None:
        ax.axhline(ref_err + 1.0, color="grey", ls="--", lw=0.8,
                   label="1 point above the recipe's baseline" if own else "1 point above the baseline")
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