"""lbsgd_cli.report.figures: the paper's Figures 1-4 as PNGs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lbsgd_cli.cli import main


def test_figures_are_written(study_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "figs"
    assert main(["plot", str(study_dir), "--out", str(out)]) == 0
    for name in ("fig1_err_vs_kn.png", "fig2_warmup.png", "fig3_kn_curves.png", "fig4_train_val.png"):
        assert (out / name).stat().st_size > 1000
