"""lbsgd_cli.report.figures: the paper's Figures 1-4 as PNGs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lbsgd_cli.cli import main


@pytest.mark.slow  # draws Figures 1-4 (the fast tier draws the methods figure and the edge labels)
def test_figures_are_written(study_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "figs"
    assert main(["plot", str(study_dir), "--out", str(out)]) == 0
    for name in ("fig1_err_vs_kn.png", "fig2_warmup.png", "fig3_kn_curves.png", "fig4_train_val.png"):
        assert (out / name).stat().st_size > 1000


def test_values_written_at_the_edge_overlap_neither_each_other_nor_the_lines():
    """Two studies beyond the edge at kn 8192 (results/fig1_err_vs_kn_studies.png): both values legible, and
    neither written on a line (results/cifar_resnet-8_45ep_bf16/fig1_methods.png's 68.0 was)."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lbsgd_cli.report.figures import label_clipped

    fig, ax = plt.subplots(figsize=(6, 4))
    top, kns = 15.0, [2 ** i for i in range(7, 14)]
    gaps = ([0, 0.1, 0.3, 0.3, 1.7, 7.8, 60.7], [0, 0.1, 0.5, 1.3, 3.4, 13.2, 66.7], [0, 1, 2, 5, 9, 12, 14])
    lines = [ax.plot(kns, [min(g, top) for g in gap], "o-")[0] for gap in gaps]
    ax.set_xscale("log", base=2)
    ax.set_ylim(top=top + 0.5)
    ax.set(xlabel="minibatch size kn", title="error vs minibatch size, per study (Fig. 1)")
    texts = label_clipped(ax, [(8192, top, f"+{gap[-1]:.1f}", line.get_color())
                               for gap, line in zip(gaps, lines) if gap[-1] > top])
    fig.tight_layout()
    fig.canvas.draw()
    boxes = [t.get_window_extent(fig.canvas.get_renderer()) for t in texts]
    assert len(boxes) == 2 and not boxes[0].overlaps(boxes[1])
    title = ax.title.get_window_extent(fig.canvas.get_renderer())
    assert not any(b.overlaps(title) for b in boxes) and all(ax.bbox.x0 < b.x0 and b.x1 < ax.bbox.x1 for b in boxes)
    for line in lines:
        path = line.get_transform().transform_path(line.get_path())  # in pixels
        assert not any(path.intersects_bbox(b, filled=False) for b in boxes)
    plt.close(fig)

