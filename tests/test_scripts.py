"""The experiment scripts of ``scripts/``: every run they start is a valid config in a directory of its own."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lbsgd_cli.validation import validate

from .conftest import ROOT, compose


def _recorded_runs(tmp_path: Path, script: str, parts: list[str], **env: str) -> list[list[str]]:
    """The `lbsgd` command lines ``scripts/experiments/SCRIPT PARTS`` starts, recorded by a fake lbsgd instead of training."""
    calls = tmp_path / "calls.jsonl"
    fake = tmp_path / "lbsgd"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)
    env = {**os.environ, "DATA": str(tmp_path), "RUNS": str(tmp_path / "runs"), "LBSGD": str(fake), **env}
    subprocess.run(["bash", str(ROOT / "scripts" / "experiments" / script), *parts], env=env, check=True, capture_output=True)
    return [json.loads(line) for line in calls.read_text().splitlines()]


@pytest.mark.slow  # composes and validates every run of the script
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_exp_cifar_starts_valid_runs_each_in_its_own_directory(tmp_path: Path) -> None:
    parts = ["ladder", "table1", "seeds", "rules", "nozg", "fp32", "probe"]
    runs = _recorded_runs(tmp_path, "exp_cifar.sh", parts, SCALE="cpu")
    assert len(runs) == 7 + 4 + 7 + 6 + 14 + 2 + 7
    dirs = [next(a for a in r if a.startswith("hydra.run.dir=")) for r in runs]
    assert len(set(dirs)) == len(dirs), "two runs of the script share a run directory"
    assert all(r[0] == "train" for r in runs)
    for overrides in {tuple(a for a in r[1:] if not a.startswith("hydra.")) for r in runs}:
        validate(compose("train", overrides))  # every key the script sets exists and every value is valid


@pytest.mark.slow  # runs the script twice
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_exp_cifar_with_jobs_starts_the_same_runs_at_once_each_logging_to_its_own_file(tmp_path: Path) -> None:
    """JOBS=3 (several runs sharing a GPU): the same command lines as one at a time, each output in logs/NAME.log."""
    fake = tmp_path / "lbsgd"  # prints its command line, after a pause that makes the runs overlap
    fake.write_text(f"#!{sys.executable}\nimport json, sys, time\ntime.sleep(0.2)\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)

    def calls(jobs: int) -> list[list[str]]:
        runs = tmp_path / f"runs{jobs}"
        env = {**os.environ, "DATA": str(tmp_path), "SCALE": "cpu", "RUNS": str(runs), "LBSGD": str(fake),
               "JOBS": str(jobs)}
        out = subprocess.run(["bash", str(ROOT / "scripts" / "experiments" / "exp_cifar.sh"), "nozg"], env=env, check=True,
                             capture_output=True, text=True).stdout
        if jobs == 1:
            return [json.loads(line) for line in out.splitlines()]
        logs = sorted((runs / "logs").glob("*.log"))
        assert out == "" and len(logs) == 14
        return [json.loads(p.read_text()) for p in logs]

    def normal(runs: list[list[str]], jobs: int) -> list[list[str]]:
        return sorted([a.replace(f"runs{jobs}", "runs") for a in r] for r in runs)

    assert normal(calls(3), 3) == normal(calls(1), 1)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_experiment_runs_take_one_core_each_unless_told_otherwise(tmp_path: Path) -> None:
    """torch's default is every core: two runs side by side would wait on each other's OpenMP threads."""
    def threads(*parts: str, **env: str) -> set[tuple[str, ...]]:
        (tmp_path / "calls.jsonl").unlink(missing_ok=True)
        runs = _recorded_runs(tmp_path, "exp_beyond.sh", ["poly", *parts], **env)
        assert len(runs) == 8
        return {tuple(a for a in r if a.startswith("threads=")) for r in runs}

    assert threads() == {("threads=1",)}
    assert threads(THREADS="2") == {("threads=2",)}
    assert threads("--", "threads=2") == {("threads=2",)}  # an override naming threads is the only one


@pytest.mark.slow  # composes and validates every run of the script
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_exp_beyond_starts_valid_runs_each_in_its_own_directory(tmp_path: Path) -> None:
    runs = _recorded_runs(tmp_path, "exp_beyond.sh", ["noise", "lars-probe", "lars", "warmup"])
    assert len(runs) == 1 + 3 + 4 + 4
    dirs = [next(a for a in r if a.startswith("hydra.run.dir=")) for r in runs]
    shared = {d for d in dirs if dirs.count(d) > 1}  # only a probe and the run that continues it (LARS_PEAK 10)
    assert shared == {d for d in dirs if d.endswith("/kn4096-lars-poly-lr10-s0")}
    probe, rest = (r for r in runs if shared & set(r))
    assert [a for a in probe if not a.startswith("checkpoint.stop_after_epoch")] == rest
    for overrides in {tuple(a for a in r[1:] if not a.startswith("hydra.")) for r in runs}:
        cfg = compose("train", overrides)
        validate(cfg)
        assert cfg.model.depth == 8 and cfg.schedule.epochs == 45 and not cfg.model.zero_init_residual
    for r in (r for r in runs if "optim=lars" in r):  # the peak rate the name says, reached by warmup
        cfg = compose("train", [a for a in r[1:] if not a.startswith("hydra.")])
        named_peak = float(next(a for a in r if a.startswith("hydra.run.dir=")).split("-lr")[1].split("-s")[0])
        assert cfg.optim.base_lr * cfg.batch.k * cfg.batch.n / cfg.optim.ref_batch == pytest.approx(named_peak)
        assert cfg.schedule.decay == "poly"
    assert sum("checkpoint.stop_after_epoch=6" in r for r in runs) == 3  # the probes
    # the noise-scale baseline is seed 0's arithmetic again: its own folder, beside the plotted runs
    noise = [d for r, d in zip(runs, dirs) if "experiment=cifar_baseline" in r]
    assert len(noise) == 1 and noise[0].endswith("/noise/kn128-noise-s0") and "/beyond/" not in noise[0]
    assert all("log.noise_scale=true" in r for r in runs if any(a.startswith("schedule.warmup_epochs=") for a in r))


def test_every_variable_exp_env_sets_is_read_by_exp_env_or_a_script_that_sources_it() -> None:
    scripts = ROOT / "scripts" / "experiments"
    env_text = (scripts / "exp_env.sh").read_text()
    code = [line.split("#", 1)[0] for line in env_text.splitlines()]
    assigned = {m.group(1) for line in code for m in re.finditer(r"(?:^|[;(]|\s)([A-Z][A-Z0-9_]*)=", line)}
    readers = [env_text] + [p.read_text() for p in scripts.glob("*.sh")
                            if re.search(r"^\s*(source|\.)\s.*exp_env\.sh", p.read_text(), re.M)]
    assert assigned >= {"DATA", "RUNS", "SCALE", "LBSGD"} and len(readers) >= 2
    unread = sorted(name for name in assigned if not any(
        re.search(rf"\$\{{?{name}\b", re.sub(rf"\b{name}=\$\{{{name}\b", "", text)) for text in readers))
    assert unread == [], f"scripts/experiments/exp_env.sh sets {unread}, which nothing reads"


def _bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "scripts" / "bench" / "bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = mod  # its generator's pool pickles functions by module name
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # runs every section of the benchmark
def test_bench_gpu_smoke_measures_every_section_through_lbsgds_own_path(tmp_path: Path) -> None:
    """scripts/bench/bench_gpu.py --smoke: tiny generated ImageNet-like files (the odd kinds included), the step
    per precision and memory format with ghost and plain BN, the loader per decode mode, end to end, the
    per-core comparison; JSON and markdown written, no row failed."""
    import torch

    bench, threads = _bench_gpu(), torch.get_num_threads()
    try:
        res = bench.main(["--smoke", "--root", str(tmp_path / "jpegs"), "--out", str(tmp_path / "out")])
    finally:
        torch.set_num_threads(threads)
    assert res["data"]["train_images"] == 24 and res["data"]["odd_files_each"] == 3
    kinds = {}
    from PIL import Image

    for path in sorted((tmp_path / "jpegs" / "train").rglob("*.JPEG")):
        with Image.open(path) as im:
            kinds.setdefault((im.format, im.mode, bool(im.info.get("progressive"))), path)
    assert {("JPEG", "RGB", False), ("JPEG", "L", False), ("JPEG", "CMYK", False), ("JPEG", "RGB", True),
            ("PNG", "RGB", False)} <= set(kinds)
    assert len(res["step"]) == 8 and len(res["loader"]) == 3 and len(res["end_to_end"]) == 2
    for section in ("step", "loader", "end_to_end"):
        for name, row in res[section].items():
            assert "error" not in row, (name, row)
            assert row["img_per_s"] > 0 and row["cpu_ms_per_step"] >= 0
    assert res["per_core"]["in_process_img_per_cpu_s"]["ratio_cpu_over_pil"] > 0
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["step"].keys() == res["step"].keys()
    assert "| step | fp32 NCHW eager ghost BN n=2 |" in (tmp_path / "out.md").read_text()


def test_bench_gpu_generates_imagenet_like_sizes(tmp_path: Path) -> None:
    """The size draw: mean about 400x350 with ImageNet's mix of landscape and portrait images."""
    import numpy as np

    bench = _bench_gpu()
    rng = np.random.default_rng(0)
    sizes = np.array([bench.image_size(rng) for _ in range(4000)])
    assert 370 < sizes[:, 0].mean() < 430 and 320 < sizes[:, 1].mean() < 380
    assert 0.7 < (sizes[:, 0] >= sizes[:, 1]).mean() < 0.85 and sizes.max() < 1000 and sizes.min() >= 16


@pytest.mark.slow  # every row is a lbsgd run in a subprocess
def test_bench_memory_smoke_runs_every_train_and_eval_row_through_the_cli(tmp_path: Path) -> None:
    """scripts/bench/bench_memory.py --smoke: lbsgd train with and without memory.checkpointing, then lbsgd eval of
    its checkpoint per offload mode and precision; every command exits 0 and no memory is claimed off CUDA."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "bench_memory.py"), "--smoke", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "bench_memory.json").read_text())["rows"]
    assert [(r["command"], r["mode"], r["precision"], r["checkpointing"]) for r in rows] == [
        ("train", "-", "fp32", False), ("train", "-", "fp32", True),
        *[("eval", m, p, False) for m in ("none", "sequential", "model") for p in ("fp32", "bf16")]]
    assert all(r["rc"] == 0 and r["peak_allocated_mb"] is None for r in rows)
    assert len({r["top1_err"] for r in rows if r["command"] == "eval"}) == 1  # the same checkpoint, the same images
    assert "| eval | sequential | bf16 | off | 8 | n/a |" in (tmp_path / "bench_memory.md").read_text()


def test_gpu_report_checks_issue_28s_goals_against_the_figures_and_fills_in_nothing(tmp_path: Path) -> None:
    """scripts/gpu/gpu_report.py: the goals are decided on the bench's rows; an absent file is 'Not measured yet'."""
    bench = {"step": {"bf16 channels_last eager ghost BN n=32": {"ms_per_step": 66.0, "img_per_s": 3878.8},
                      "bf16 channels_last eager plain BN": {"ms_per_step": 62.0, "img_per_s": 4129.0},
                      "fp32 NCHW eager ghost BN n=32": {"ms_per_step": 200.0, "img_per_s": 1280.0},
                      "fp32 NCHW eager plain BN": {"ms_per_step": 170.0, "img_per_s": 1505.9}},
             "loader": {"decode=cpu": {"img_per_s": 3000.0}, "decode=gpu": {"img_per_s": 6000.0}},
             "end_to_end": {"decode=gpu bf16 channels_last eager ghost BN n=32": {"img_per_s": 3100.0}}}
    (tmp_path / "bench_gpu.json").write_text(json.dumps(bench))
    (tmp_path / "cuda_report.jsonl").write_text(json.dumps({"device": "cuda", "test": "pytest", "rc": 0,
                                                            "summary": "7 passed in 80s"}) + "\n")
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "scripts" / "gpu" / "gpu_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    text = report.main([str(tmp_path), "--out", str(tmp_path / "gpu.md")])
    assert "End to end, bf16: 3,100 img/s" in text and "goal >= 3,000: met" in text
    assert "bf16 channels_last eager 1.06x, fp32 NCHW eager 1.18x" in text and "not met (fp32 NCHW eager)" in text
    assert "decode=cpu 0.77x, decode=gpu 1.55x; goal >= 1.3x: met by decode=gpu" in text
    assert "7 passed in 80s (exit 0)" in text
    assert text.count("Not measured yet.") == 1 and "Device: not recorded" in text  # the memory table; no device.txt


def test_residual_gammas_reads_each_blocks_branch_and_projection_scale_from_a_checkpoint(tmp_path: Path,
                                                                                         capsys) -> None:
    """Table 2b's mechanism (issue 36): the learned |gamma| of each residual branch, read as data from checkpoints."""
    import torch
    from omegaconf import OmegaConf

    from lbsgd_cli.checkpoint import FORMAT
    from lbsgd_cli.models import build_model

    spec = importlib.util.spec_from_file_location("residual_gammas",
                                                  ROOT / "scripts" / "experiments" / "residual_gammas.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model_cfg = {"arch": "cifar_resnet", "depth": 8, "shortcut": "B", "zero_init_residual": True, "fc_init_std": 0.01,
                 "bn_momentum": 0.1, "bn_eps": 1e-5}
    model = build_model(OmegaConf.create(model_cfg), 10, 3, None)
    with torch.no_grad():  # "trained": the second block's branch grew to 0.5, the first projection's BN to 2
        model.layer2[0].bn2.weight.fill_(-0.5)
        model.layer2[0].proj[1].weight.fill_(2.0)
    run = tmp_path / "kn128-sB-s0"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"format": FORMAT, "model": model.state_dict(), "epoch": 45, "config": {"model": model_cfg}},
               run / "checkpoints" / "last.pt")
    assert mod.main([str(run)]) == 0
    assert "| kn128-sB-s0 | 45 | True | B | 0.00 0.50 0.00 | 2.00 1.00 | none |" in capsys.readouterr().out
    assert mod.main(["--init", str(run / "checkpoints" / "last.pt")]) == 0  # as the config initialises it
    assert "| kn128-sB-s0 | 0 | True | B | 0.00 0.00 0.00 | 1.00 1.00 |" in capsys.readouterr().out  # named by its run
    option_a = {**model_cfg, "shortcut": "A"}  # the paper's zero-gamma with zero-padded shortcuts: dead channels
    torch.save({"format": FORMAT, "model": build_model(OmegaConf.create(option_a), 10, 3, None).state_dict(),
                "epoch": 3, "config": {"model": option_a}}, tmp_path / "option-a.pt")
    assert mod.main([str(tmp_path / "option-a.pt")]) == 0
    assert "| option-a.pt | 3 | True | A | 0.00 0.00 0.00 | - | 16 of 32 in layer2, 48 of 64 in layer3 |" \
        in capsys.readouterr().out
    (tmp_path / "foreign.pt").write_bytes(b"not a checkpoint")
    assert mod.main([str(run), str(tmp_path / "foreign.pt")]) == 2  # one line, nothing printed before it
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "foreign.pt" in err
