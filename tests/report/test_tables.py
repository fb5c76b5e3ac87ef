"""lbsgd_cli.report.tables: diverged runs shown as diverged, means over seeds, studies and methods side by side."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from lbsgd_cli.cli import main
from lbsgd_cli.report.runs import find_runs
from lbsgd_cli.report.studies import Study
from lbsgd_cli.report.tables import tables, zero_gamma_pairs

from .conftest import make_run


def test_tables_show_divergence_as_diverged_and_means_over_seeds(study_dir: Path) -> None:
    text = "\n".join(tables(Study.of(find_runs([study_dir]))))
    assert "| baseline | 128 | 0.1 | 22.00 ± 1.41 | 0,1 |" in text  # medians of the last (5, here 3) epochs
    assert "| none warmup | 2048 | 1.6 | diverged | 0 |" in text
    assert "| gradual warmup | 2048 | 1.6 | 30.00 | 0 |" in text
    assert "| none warmup | 512 | 0.4 | 33.00 | 0 |" in text and "| gradual warmup | 512 | 0.4 | 30.00 | 0 |" in text
    assert text.index("| gradual warmup | 512 |") < text.index("| none warmup | 2048 |")  # ascending kn
    assert "Table 2a: the rate rule at kn = 2048" in text
    assert "| linear | 0.1 (the recipe) | 1.6 | 30.00 | +8.00 | 0 |" in text
    assert "| sqrt | 0.1 | 0.4 | 50.00 | +28.00 | 0 |" in text
    assert "Table 2b: zero-gamma at kn = 2048" in text and "| False | 1.6 | 50.00 | +28.00 | 0 |" in text
    assert "| True (the recipe) | 1.6 | 30.00 |" in text


@pytest.mark.slow  # draws every figure of two studies
def test_studies_of_two_lengths_get_figure_1_side_by_side(study_dir: Path, tmp_path: Path) -> None:
    longer = tmp_path / "longer"
    make_run(longer, "base", 4, "none", errs=(0.9, 0.2, 0.19), epochs=6)
    make_run(longer, "large", 64, errs=(0.9, 0.205, 0.2), epochs=6)
    out = tmp_path / "both"
    assert main(["plot", str(study_dir), str(longer), "--out", str(out), "--no-figures"]) == 0
    text = (out / "tables.md").read_text()
    assert "| kn | cifar_resnet-8_3ep | cifar_resnet-8_6ep |" in text
    assert "| 2048 | 30.00 (+8.00) | 20.50 (+0.50) |" in text and "| 512 | 30.00 (+8.00) | - |" in text
    assert len(list(csv.DictReader(open(out / "summary.csv")))) == 11  # every run of both
    pytest.importorskip("matplotlib")
    assert main(["plot", str(study_dir), str(longer), "--out", str(out)]) == 0
    assert (out / "fig1_err_vs_kn_studies.png").stat().st_size > 1000
    assert (out / "cifar_resnet-8_6ep" / "fig1_err_vs_kn.png").exists()


def test_methods_beyond_the_paper_get_their_own_table_and_figure_1(study_dir: Path, tmp_path: Path) -> None:
    """LARS and a longer warmup (results/beyond.md) are not rows of the recipe's tables: each method's best
    finished setting per kn is set beside the recipe's ladder, and a probe beside the recipe at its epoch."""
    beyond = tmp_path / "beyond"
    for seed, err in ((0, 0.24), (1, 0.26)):  # LARS at its best rate, 2 seeds; a worse rate; a diverged one
        make_run(beyond, f"lars-lr8-s{seed}", 64, seed=seed, optim="lars", decay="poly", base_lr=0.5,
                 errs=(0.9, err, err))
    make_run(beyond, "lars-lr16-s0", 64, optim="lars", decay="poly", base_lr=1.0, errs=(0.9, 0.4, 0.4))
    make_run(beyond, "lars-lr32-s0", 64, optim="lars", decay="poly", base_lr=2.0, diverged=True)
    probe = make_run(beyond, "lars-lr8-probe", 128, optim="lars", decay="poly", base_lr=0.25, errs=(0.8, 0.6))
    cfg = yaml.safe_load((probe / "config.yaml").read_text())  # 2 of 3 epochs: checkpoint.stop_after_epoch=2
    (probe / "config.yaml").write_text(yaml.safe_dump({**cfg, "checkpoint": {"stop_after_epoch": 2}}))
    make_run(beyond, "sgd-w10-s1", 128, seed=1, warmup_epochs=10.0, errs=(0.9,))  # still running
    make_run(beyond, "sgd-w10", 64, warmup_epochs=10.0, errs=(0.9, 0.28, 0.28))
    make_run(study_dir, "ladder-4096", 128, errs=(0.9, 0.5, 0.45))  # the recipe at the probe's kn
    make_run(study_dir, "w5", 16, seed=1, warmup_epochs=5.0, errs=(0.5, 0.3, 0.23))  # the paper's 5 epochs, said

    out = tmp_path / "out"
    assert main(["plot", str(study_dir), str(beyond), "--out", str(out), "--no-figures"]) == 0
    text = (out / "tables.md").read_text()
    recipe = text[:text.index("## Beyond the paper")]
    assert "lars" not in recipe.lower() and "| 2048 | 1.6 | gradual | linear | True | 3 |" in recipe
    assert "Table 2a: the rate rule at kn = 2048" in recipe and "| linear | 0.5 |" not in recipe
    assert "| 512 | 0.4 | 30 | 30.00 ± 0.00 | +8.00 | 0,1 |" in recipe  # warmup_epochs=5 is the recipe's
    methods = text[text.index("## Beyond the paper"):]
    assert "| LARS, poly decay | 2048 | 8 | gradual 5 ep | 3 | 25.00 ± 1.41 | +3.00 | 26.00 / 25.00 | 0,1 |" in methods
    assert "| LARS, poly decay | 2048 | 32 | gradual 5 ep | 3 | diverged | - | diverged | 0 |" in methods
    assert "| LARS, poly decay | 4096 | 8 | gradual 5 ep | 2 of 3 (probe) | 60.00 (epoch 2) | recipe at epoch 2: 50.00 |" \
        in methods
    assert "| SGD, longer warmup | 2048 | 1.6 | gradual 10 ep | 3 | 28.00 | +6.00 |" in methods
    assert "| SGD, longer warmup | 4096 | 3.2 | gradual 10 ep | 1 of 3 (unfinished) | 90.00 (epoch 1) | - |" in methods
    assert "| 2048 | 30.00 (+8.00) | 25.00 ± 1.41 (+3.00; lr 8, gradual warmup 5 ep; seeds 0,1) " \
           "| 28.00 (+6.00; lr 1.6, gradual warmup 10 ep; seeds 0) |" in methods
    assert "| 4096 | 50.00 (+28.00) | - | - |" in methods  # a probe is no finished setting
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert {(r["run"], r["optim"], r["decay"]) for r in rows if r["experiment"] == "beyond"} >= {
        ("lars-lr8-s0", "lars", "poly"), ("sgd-w10", "sgd", "step")}
    pytest.importorskip("matplotlib")
    assert main(["plot", str(study_dir), str(beyond), "--out", str(out)]) == 0
    assert (out / "fig1_methods.png").exists() and (out / "fig1_err_vs_kn.png").exists()


def test_a_schedule_with_its_own_baseline_gets_its_flat_region_measured_from_it(study_dir: Path, tmp_path: Path) -> None:
    """Poly decay run at the baseline's kn too (issue 36): its ladder is compared with that baseline, with the
    recipe's and with the recipe at the same kn, and its flat region ends where it leaves its own 1 point."""
    beyond = tmp_path / "beyond"
    make_run(beyond, "poly-base", 4, "none", decay="poly", errs=(0.9, 0.19, 0.19))
    make_run(beyond, "poly-512", 16, decay="poly", warmup_epochs=15.0, errs=(0.9, 0.195, 0.195))
    make_run(beyond, "poly-2048", 64, decay="poly", warmup_epochs=15.0, errs=(0.9, 0.205, 0.205))
    out = tmp_path / "out"
    assert main(["plot", str(study_dir), str(beyond), "--out", str(out), "--no-figures"]) == 0
    text = (out / "tables.md").read_text()
    flat = text[text.index("Flat region per schedule"):]
    assert "| recipe (SGD, step decay, warmup 5 ep) | 128 | 22.00 ± 1.41 | +0.00 | +0.00 | +0.00 | 0,1 |" in flat
    assert "| SGD, poly decay | 128 | 19.00 | +0.00 | -3.00 | -3.00 | 0 |" in flat
    assert "| SGD, poly decay | 512 | 19.50 | +0.50 | -2.50 | -10.50 | 0 |" in flat
    assert "| SGD, poly decay | 2048 | 20.50 | +1.50 | -1.50 | -9.50 | 0 |" in flat  # within the recipe's 1 point, not its own
    assert "recipe (SGD, step decay, warmup 5 ep): kn 128; SGD, poly decay: kn 512." in flat
    assert "| SGD, poly decay | 128 | 0.1 | none | 3 | 19.00 |" in text  # no warmup has no length
    assert "| 128 | 22.00 ± 1.41 (+0.00) | 19.00 (-3.00; lr 0.1, no warmup; seeds 0) |" in text
    assert main(["plot", str(study_dir), "--out", str(tmp_path / "alone"), "--no-figures"]) == 0
    assert "Flat region per schedule" not in (tmp_path / "alone" / "tables.md").read_text()  # no method, no table
    pytest.importorskip("matplotlib")
    assert main(["plot", str(study_dir), str(beyond), "--out", str(out)]) == 0
    assert (out / "fig1_methods.png").exists()


def test_table_2b_is_set_across_networks_with_zero_gammas_cost_in_val_and_training_error(study_dir: Path,
                                                                                         tmp_path: Path) -> None:
    """Issue 36: zero-gamma's cost with option A's padded shortcuts beside its cost with projections (shortcut B)."""
    one = "\n".join(zero_gamma_pairs(find_runs([study_dir])))
    assert one == ""  # one network: its own Table 2b says it all
    for seed, on, off in ((0, (0.9, 0.20, 0.19), (0.9, 0.21, 0.18)), (1, (0.9, 0.22, 0.21), (0.9, 0.20, 0.20))):
        make_run(study_dir, f"base-sB-s{seed}", 4, "none", seed, errs=on, shortcut="B")
        make_run(study_dir, f"base-sB-nozg-s{seed}", 4, "none", seed, zero_gamma=False, errs=off, shortcut="B")
    make_run(study_dir, "large-sB-nozg", 64, zero_gamma=False, errs=(0.9, 0.3), shortcut="B")  # unfinished
    make_run(study_dir, "large-sB", 64, errs=(0.9, 0.3, 0.25), shortcut="B")
    text = "\n".join(zero_gamma_pairs(find_runs([study_dir])))
    assert "## Table 2b across networks" in text
    # A: kn 2048 gradual, on 30.00 (train 25 + 1), off 50.00 (train 27 + 1)
    assert "| cifar_resnet-8 | 3 | bf16 | unknown | 2048 | gradual 5 ep | linear | 0.1 | 30.00 | 50.00 | -20.00 " \
           "| 26.00 / 28.00 | 0 / 0 |" in text
    # B: kn 128, medians of the 3 epochs 0.20, 0.22 on (train 20, 22 at the end) and 0.21, 0.20 off (train 19, 21)
    assert "| cifar_resnet-8-shortcutB | 3 | bf16 | unknown | 128 | none | linear | 0.1 | 21.00 ± 1.41 | 20.50 ± 0.71 " \
           "| +0.50 | 21.00 / 20.00 | 0,1 / 0,1 |" in text
    assert "shortcutB | 3 | bf16 | unknown | 2048 |" not in text  # its off run is not finished
    assert text.index("shortcutB | 3 | bf16 | unknown | 128") > text.index("| cifar_resnet-8 | 3 |")
