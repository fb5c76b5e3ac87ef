"""``lbsgd plot``: the study's parts found from configs alone, diverged runs shown as diverged."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from lbsgd_cli.cli import main
from lbsgd_cli.plot import FIELDS, Study, find_runs, tables


def make_run(root: Path, name: str, k: int, warmup: str = "gradual", seed: int = 0, rule: str = "linear",
             zero_gamma: bool = True, errs: tuple[float, ...] = (0.5, 0.4, 0.3), diverged: bool = False,
             epochs: int = 3, precision: str = "bf16", base_lr: float = 0.1, device: str | None = None,
             optim: str | None = None, decay: str | None = None, warmup_epochs: float | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    cfg = {"batch": {"k": k, "n": 32}, "optim": {"base_lr": base_lr, "ref_batch": 128, "lr_rule": rule},
           "schedule": {"warmup": warmup, "epochs": epochs}, "model": {"arch": "cifar_resnet", "depth": 8,
                                                      "zero_init_residual": zero_gamma},
           "seed": seed, "precision": precision}
    for group, key, value in (("optim", "name", optim), ("schedule", "decay", decay),
                              ("schedule", "warmup_epochs", warmup_epochs)):
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


def test_parts_are_found_from_the_configs(study_dir: Path) -> None:
    study = Study.of(find_runs([study_dir]))
    assert study.base_kn == 128 and study.large_kn == 2048 and study.warmup_kns == [512, 2048]
    assert sorted(study.ladder()) == [128, 512, 2048]
    assert {r.row["seed"] for r in study.baseline()} == {0, 1}


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


def test_cli_writes_summary_with_steps_and_diverged(study_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["plot", str(study_dir), "--out", str(out), "--no-figures"]) == 0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert list(rows[0]) == FIELDS and len(rows) == 9
    none = next(r for r in rows if r["run"] == "large-none")
    assert none["diverged"] == "True" and none["val_err"] == "" and none["steps"] == "7"
    assert next(r for r in rows if r["run"] == "base-s0")["steps"] == "30"


@pytest.mark.slow  # draws Figures 1-4 (the fast tier draws the methods figure and the edge labels)
def test_figures_are_written(study_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "figs"
    assert main(["plot", str(study_dir), "--out", str(out)]) == 0
    for name in ("fig1_err_vs_kn.png", "fig2_warmup.png", "fig3_kn_curves.png", "fig4_train_val.png"):
        assert (out / name).stat().st_size > 1000


def test_no_runs_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lbsgd: error: no run") and err.count("\n") == 1
    assert main(["plot", str(tmp_path / "missing")]) == 2


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


def test_values_written_at_the_edge_overlap_neither_each_other_nor_the_lines():
    """Two studies beyond the edge at kn 8192 (results/fig1_err_vs_kn_studies.png): both values legible, and
    neither written on a line (results/cifar_resnet-8_45ep_bf16/fig1_methods.png's 68.0 was)."""
    pytest.importorskip("matplotlib")
    from lbsgd_cli import plot

    plt = plot._pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    top, kns = 15.0, [2 ** i for i in range(7, 14)]
    gaps = ([0, 0.1, 0.3, 0.3, 1.7, 7.8, 60.7], [0, 0.1, 0.5, 1.3, 3.4, 13.2, 66.7], [0, 1, 2, 5, 9, 12, 14])
    lines = [ax.plot(kns, [min(g, top) for g in gap], "o-")[0] for gap in gaps]
    ax.set_xscale("log", base=2)
    ax.set_ylim(top=top + 0.5)
    ax.set(xlabel="minibatch size kn", title="error vs minibatch size, per study (Fig. 1)")
    texts = plot.label_clipped(ax, [(8192, top, f"+{gap[-1]:.1f}", line.get_color())
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
