"""lbsgd_cli.report.studies: the study's parts found from configs alone; other networks, schedules,
precisions, devices and settings kept apart."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from lbsgd_cli.cli import main
from lbsgd_cli.report.runs import find_runs, load_run
from lbsgd_cli.report.studies import Study, flat_edge, split_studies
from lbsgd_cli.report.tables import tables

from .conftest import make_run


def test_parts_are_found_from_the_configs(study_dir: Path) -> None:
    study = Study.of(find_runs([study_dir]))
    assert study.base_kn == 128 and study.large_kn == 2048 and study.warmup_kns == [512, 2048]
    assert sorted(study.ladder()) == [128, 512, 2048]
    assert {r.row["seed"] for r in study.baseline()} == {0, 1}


def test_runs_of_other_networks_are_another_study(study_dir: Path, tmp_path: Path) -> None:
    other = make_run(study_dir, "resnet20", 64, "none")
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["model"]["depth"] = 20
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "two"
    assert main(["plot", str(study_dir), "--out", str(out), "--no-figures"]) == 0
    text = (out / "tables.md").read_text()
    assert "## cifar_resnet-20_3ep" in text and "## cifar_resnet-8_3ep" in text
    assert "| none warmup | 2048 | 1.6 | diverged | 0 |" in text  # the depth-20 run is not mixed into it


def test_an_fp32_rerun_is_a_study_of_its_own_not_a_second_seed(study_dir: Path, tmp_path: Path) -> None:
    make_run(study_dir, "base-s0-fp32", 4, "none", 0, errs=(0.9, 0.19, 0.17), precision="fp32")
    make_run(study_dir, "large-gradual-fp32", 64, errs=(0.9, 0.26, 0.24), precision="fp32")
    out = tmp_path / "out"
    assert main(["plot", str(study_dir), "--out", str(out), "--no-figures"]) == 0
    text = (out / "tables.md").read_text()
    assert "## cifar_resnet-8_3ep_bf16" in text and "## cifar_resnet-8_3ep_fp32" in text
    assert "| kn | cifar_resnet-8_3ep_bf16 | cifar_resnet-8_3ep_fp32 |" in text
    # medians of the 3 epochs: the bf16 baseline keeps its two seeds (21, 23), fp32's is its one run
    assert "| 128 | 22.00 ± 1.41 (+0.00) | 19.00 (+0.00) |" in text
    assert "| 2048 | 30.00 (+8.00) | 26.00 (+7.00) |" in text


def test_another_base_rate_is_a_row_of_table_2a_not_a_seed_of_the_recipe(study_dir: Path) -> None:
    make_run(study_dir, "large-half-rate", 64, base_lr=0.05, errs=(0.9, 0.3, 0.26))  # the paper's 0.05·k
    make_run(study_dir, "base-double-rate", 4, "none", base_lr=0.2, errs=(0.9, 0.3, 0.28))
    study = Study.of(find_runs([study_dir]))
    assert study.default["base_lr"] == 0.1 and {r.row["seed"] for r in study.baseline()} == {0, 1}
    assert [r.row["run"] for r in study.ladder()[2048]] == ["large-gradual"]
    text = "\n".join(tables(study))
    assert "| linear | 0.05 | 0.8 | 30.00 | +8.00 | 0 |" in text  # lr 0.8 = 0.05 x 2048 / 128
    assert "| gradual warmup | 2048 | 1.6 | 30.00 | 0 |" in text  # Table 1 holds the recipe's run only
    assert "Table 2a: the rate rule at kn = 128" in text  # the baseline's kn, whose runs have no warmup
    assert "| linear | 0.2 | 0.2 | 30.00 | +8.00 | 0 |" in text


def test_a_sweep_that_changes_a_setting_for_every_run_gets_its_own_recipe(tmp_path: Path) -> None:
    root = tmp_path / "nozg"  # e.g. the whole ladder with model.zero_init_residual=false
    make_run(root, "base", 4, "none", zero_gamma=False, errs=(0.9, 0.2, 0.19))
    make_run(root, "large", 32, zero_gamma=False, errs=(0.9, 0.21, 0.2))
    make_run(root, "large-zg", 32, errs=(0.9, 0.25, 0.24))  # one run back at the paper's zero-gamma
    study = Study.of(find_runs([root]))
    assert study.default["zero_gamma"] is False and sorted(study.ladder()) == [128, 1024]
    assert [r.row["run"] for r in study.baseline()] == ["base"]
    text = "\n".join(tables(study))
    assert "| False (the recipe) | 0.8 | 21.00 | +1.00 | 0 |" in text and "| True | 0.8 | 25.00 | +5.00 | 0 |" in text


@pytest.mark.slow  # draws every figure of three studies
def test_a_setting_rerun_as_a_ladder_gets_its_own_table_1_and_figure_1(study_dir: Path, tmp_path: Path) -> None:
    make_run(study_dir, "base-nozg", 4, "none", zero_gamma=False, errs=(0.9, 0.19, 0.18))
    make_run(study_dir, "ladder-16-nozg", 16, zero_gamma=False, errs=(0.9, 0.2, 0.185))
    make_run(study_dir, "large-none-nozg", 64, "none", zero_gamma=False, errs=(0.9, 0.4, 0.29))
    study = Study.of(find_runs([study_dir]))
    assert study.default["zero_gamma"] is True and sorted(study.variants) == ["zg-off"]
    variant = study.variants["zg-off"]
    assert [r.row["run"] for r in variant.baseline()] == ["base-nozg"] and variant.warmup_kns == [2048]
    assert [r.row["run"] for r in variant.ladder()[2048]] == ["nozg"]
    text = "\n".join(tables(study))
    assert "Table 1 (zg-off): warmup at the large kn" in text and "| baseline | 128 | 0.1 | 19.00 | 0 |" in text
    assert "| none warmup | 2048 | 1.6 | 40.00 | 0 |" in text  # medians of 3 epochs
    assert "Figure 1 (zg-off)" in text and "| 512 | 0.4 | 30 | 20.00 | +1.00 | 0 |" in text
    assert "| True (the recipe) | 1.6 | 30.00 | +8.00 | 0 |" in text  # still a row of the recipe's Table 2b
    out = tmp_path / "out"
    assert main(["plot", str(study_dir), "--out", str(out), "--no-figures"]) == 0
    text = (out / "tables.md").read_text()
    assert "| kn | cifar_resnet-8_3ep | cifar_resnet-8_3ep_zg-off |" in text
    pytest.importorskip("matplotlib")
    assert main(["plot", str(study_dir), "--out", str(out)]) == 0
    assert (out / "fig1_err_vs_kn.png").exists() and (out / "cifar_resnet-8_3ep_zg-off" / "fig2_warmup.png").exists()


def test_the_study_rerun_on_a_gpu_is_a_study_of_its_own(study_dir: Path, tmp_path: Path) -> None:
    """A GPU rerun of a seed is not a second seed: its runs get their own tables, named with the device."""
    gpu = tmp_path / "gpu"
    make_run(gpu, "base-s0", 4, "none", 0, errs=(0.9, 0.19, 0.18), device="cuda:0")
    make_run(gpu, "large-gradual", 64, errs=(0.9, 0.26, 0.24), device="cuda:0")
    for run in study_dir.iterdir():  # the CPU's runs, one of them resumed there
        (run / "run_info.json").write_text(json.dumps({"starts": [{"device": "cpu"}, {"device": "cpu"}]}))
    make_run(study_dir, "unrecorded", 16, seed=1, errs=(0.5, 0.3, 0.25))
    make_run(study_dir, "moved", 16, seed=2, errs=(0.5, 0.3, 0.25), device="cuda:0")
    (study_dir / "moved" / "run_info.json").write_text(json.dumps({"starts": [{"device": "cpu"}, {"device": "cuda:1"}]}))
    out = tmp_path / "out"
    assert main(["plot", str(study_dir), str(gpu), "--out", str(out), "--no-figures"]) == 0
    text = (out / "tables.md").read_text()
    assert "## cifar_resnet-8_3ep_cuda" in text and "## cifar_resnet-8_3ep\n" in text
    assert "| kn | cifar_resnet-8_3ep | cifar_resnet-8_3ep_cuda |" in text
    assert "| 128 | 22.00 ± 1.41 (+0.00) | 19.00 (+0.00) |" in text  # the GPU's baseline is its own
    rows = {(r["experiment"], r["run"]): r["device"] for r in csv.DictReader(open(out / "summary.csv"))}
    assert rows[("gpu", "base-s0")] == "cuda" and rows[("sweep", "base-s0")] == "cpu"
    assert rows[("sweep", "unrecorded")] == "unknown" and rows[("sweep", "moved")] == "cpu+cuda"
    assert "## cifar_resnet-8_3ep_unknown" in text and "## cifar_resnet-8_3ep_cpu+cuda" in text
    # the same config and seed on both devices, side by side (medians of the 3 epochs)
    assert "| cifar_resnet-8 bf16 | 3 | 128 | none | linear | 0.1 | True | 0 | 21.00 | 19.00 | -2.00 |" in text
    assert "| cifar_resnet-8 bf16 | 3 | 2048 | gradual | linear | 0.1 | True | 0 | 30.00 | 26.00 | -4.00 |" in text
    assert "2 pairs: mean difference -3.00 points, mean absolute 3.00, largest -4.00" in text


def test_a_study_without_runs_at_the_baseline_kn_is_left_out_of_the_comparison(study_dir: Path,
                                                                               tmp_path: Path) -> None:
    """Gaps from a baseline at another kn do not compare: a partial rerun's ladder (no kn 128) stays out."""
    gpu = tmp_path / "gpu"
    for name, k, errs in (("ladder-512", 16, (0.9, 0.3, 0.25)), ("ladder-1024", 32, (0.9, 0.3, 0.27))):
        make_run(gpu, name, k, errs=errs, device="cuda:0")
    make_run(tmp_path / "long", "base", 4, "none", errs=(0.9, 0.2, 0.2), epochs=6)
    make_run(tmp_path / "long", "large", 64, errs=(0.9, 0.3, 0.3), epochs=6)
    for run in study_dir.iterdir():
        (run / "run_info.json").write_text(json.dumps({"starts": [{"device": "cpu"}]}))
    out = tmp_path / "out"
    assert main(["plot", str(study_dir), str(gpu), str(tmp_path / "long"), "--out", str(out), "--no-figures"]) == 0
    text = (out / "tables.md").read_text()
    assert "| kn | cifar_resnet-8_3ep | cifar_resnet-8_6ep |" in text  # both from kn 128
    assert "## cifar_resnet-8_3ep_cuda" in text  # its own tables still, gaps from its smallest kn


def test_projection_shortcut_runs_are_a_study_of_their_own(study_dir: Path, tmp_path: Path) -> None:
    """model.shortcut=B beside the default A (Table 2b's cause, issue 36): not a second seed of the A study."""
    make_run(study_dir, "base-sB-s0", 4, "none", 0, errs=(0.9, 0.19, 0.18), shortcut="B")
    make_run(study_dir, "large-gradual-sB", 64, errs=(0.9, 0.26, 0.24), shortcut="B")
    make_run(study_dir, "base-sA-s2", 4, "none", 2, errs=(0.9, 0.22, 0.22), shortcut="A")  # A said: the default
    runs = find_runs([study_dir])
    assert {r.row["run"]: r.row["arch"] for r in runs if r.row["run"].startswith("base")} == {
        "base-s0": "cifar_resnet-8", "base-s1": "cifar_resnet-8", "base-sA-s2": "cifar_resnet-8",
        "base-sB-s0": "cifar_resnet-8-shortcutB"}
    studies = split_studies(runs)
    assert sorted(studies) == ["cifar_resnet-8-shortcutB_3ep", "cifar_resnet-8_3ep"]
    assert {r.row["seed"] for r in Study.of(studies["cifar_resnet-8_3ep"]).baseline()} == {0, 1, 2}
    assert [r.row["run"] for r in Study.of(studies["cifar_resnet-8-shortcutB_3ep"]).baseline()] == ["base-sB-s0"]
    out = tmp_path / "out"
    assert main(["plot", str(study_dir), "--out", str(out), "--no-figures"]) == 0
    text = (out / "tables.md").read_text()
    assert "## cifar_resnet-8-shortcutB_3ep" in text and "## cifar_resnet-8_3ep" in text
    assert "| kn | cifar_resnet-8-shortcutB_3ep | cifar_resnet-8_3ep |" in text
    assert "| 128 | 19.00 (+0.00) | 22.00 ± 1.00 (+0.00) |" in text  # medians of 3 epochs: B's own baseline


def test_other_networks_keep_their_arch_as_their_name(tmp_path: Path) -> None:
    run = make_run(tmp_path / "sweep", "cnn", 4, "none")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"] = {"arch": "small_cnn", "zero_init_residual": True}  # no depth, no shortcut
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert [r.row["arch"] for r in find_runs([tmp_path / "sweep"])] == ["small_cnn"]


def test_the_flat_region_ends_at_the_first_kn_more_than_1_point_above_the_baseline(tmp_path: Path) -> None:
    runs = {kn: [load_run(make_run(tmp_path, f"kn{kn}", kn // 32, errs=(e, e)))] for kn, e in
            ((128, 0.20), (256, 0.205), (512, 0.211), (1024, 0.209), (2048, 0.25))}
    assert flat_edge(runs, runs[128]) == 256  # 512 is 1.1 points above: 1024 back within 1 does not count
    assert flat_edge(runs, runs[128], tolerance=0.02) == 1024
    diverged = {**runs, 256: [load_run(make_run(tmp_path, "div", 8, diverged=True))]}
    assert flat_edge(diverged, runs[128]) == 128
