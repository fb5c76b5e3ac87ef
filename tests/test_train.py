"""End-to-end ``lbsgd train`` in subprocesses: the default run, run directory contents, resume, sweeps, bad images.

The in-process checks of bad input and of the composed configs are in test_cli.py and test_config.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from .conftest import ROOT, SHORT, lbsgd, make_image_tree, run_cli


@pytest.mark.slow
def test_default_run_reaches_paper_quality_on_embedded_digits(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", f"hydra.run.dir={run}", "log.progress=plain")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "done: val top-1 error" in out and "images/s" in out and f"tensorboard --logdir {run}" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_top1_err"] <= 0.05
    assert summary["wall_time_s"] < 180

    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    per_iter = [r for r in recs if "lr" in r]
    per_epoch = [r for r in recs if "val/err" in r]
    assert {"iter", "epoch", "lr", "train/loss"} <= per_iter[0].keys()
    assert per_iter[1]["iter"] - per_iter[0]["iter"] == 10  # log.every
    assert len(per_epoch) == 30
    assert {"epoch", "train/err", "val/err", "val/top5_err", "images_per_sec"} <= per_epoch[0].keys()
    assert all(0 <= r["val/err"] <= 1 and 0 <= r["train/err"] <= 1 for r in per_epoch)

    info = json.loads((run / "run_info.json").read_text())["starts"][0]
    assert info["torch"] == torch.__version__ and info["world_size"] == 1 and info["seed"] == 0
    assert info["git_commit"]
    assert (run / "config.yaml").read_text().startswith("batch:")
    assert list((run / "tb").glob("events.out.tfevents.*"))
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert {"model", "optimizer", "iteration", "rng", "config", "epoch"} <= ckpt.keys()
    assert ckpt["iteration"] == 30 * (1437 // 128)

    written = (run / "summary.json").read_bytes()
    again = run_cli("train", f"hydra.run.dir={run}", "log.progress=plain")  # same command: nothing to redo
    assert again.returncode == 0 and "already complete" in again.stdout
    assert (run / "summary.json").read_bytes() == written  # its wall time is the run's, not this no-op's


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    args = [*SHORT, "checkpoint.every_iters=4", "batch.k=2"]
    ref = tmp_path / "ref"
    assert run_cli("train", f"hydra.run.dir={ref}", *args).returncode == 0

    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lbsgd_cli", "train", f"hydra.run.dir={run}", *args],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["iteration"] >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.wait()
    stopped_at = torch.load(ckpt, weights_only=False)
    assert 0 < stopped_at["iteration"] < 3 * (1437 // 64)

    resumed = run_cli("train", f"hydra.run.dir={run}", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at iteration" in resumed.stdout
    a, b = _weights(ref), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs_ref = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines() if "val/err" in x]
    epochs_run = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "val/err" in x]
    assert [r["val/err"] for r in epochs_ref] == [r["val/err"] for r in epochs_run]
    assert [r["train/err"] for r in epochs_ref] == [r["train/err"] for r in epochs_run]
    # wall time spans both starts: the killed one's time up to its checkpoint is carried on
    total = torch.load(ckpt, weights_only=False)["elapsed_s"]
    assert json.loads((run / "summary.json").read_text())["wall_time_s"] >= total - 0.01  # rounded to 10 ms
    assert total > stopped_at["elapsed_s"] > 0
    assert stopped_at["elapsed_s"] < epochs_run[-1]["time"] <= total


@pytest.mark.slow
def test_other_config_in_same_run_dir_is_refused_and_nothing_is_overwritten(tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", f"hydra.run.dir={run}", *SHORT, "schedule.epochs=1").returncode == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = run_cli("train", f"hydra.run.dir={run}", *SHORT, "schedule.epochs=1", "batch.k=2")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "batch.k" in proc.stderr and "Traceback" not in proc.stderr
    assert before == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_multirun_sweep_gives_one_run_dir_per_value(tmp_path):
    proc = run_cli("train", "-m", "batch.k=1,2", "schedule.epochs=1", "schedule.warmup=none",
                   "schedule.milestones=[5]", "threads=1", "log.progress=none", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    for k in (1, 2):
        run = next(tmp_path.glob(f"*batch.k={k}*"))
        cfg = (run / "config.yaml").read_text()
        assert f"k: {k}\n" in cfg and (run / "checkpoints" / "last.pt").exists()


def test_bad_images_are_one_line_errors(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class=3, val_per_class=1)
    (root / "train" / "b" / "0002.jpg").write_bytes(b"\x00garbage")
    proc = lbsgd("train", "data=imagefolder", f"data.root={root}", f"data.cache_dir={tmp_path / 'c'}",
                 "batch.k=1", "batch.n=2", "schedule.epochs=1", "schedule.milestones=[5]", "threads=1",
                 f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "0002.jpg" in proc.stderr and proc.stderr.strip().count("\n") == 0
    for f in (root / "train" / "b").iterdir():
        f.unlink()
    proc = lbsgd("train", "data=imagefolder", f"data.root={root}", "threads=1", f"hydra.run.dir={tmp_path / 'run2'}")
    assert proc.returncode == 2 and "has no images" in proc.stderr and "train/b" in proc.stderr


@pytest.mark.slow
def test_imagefolder_run_end_to_end(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class=16, val_per_class=4)
    run = tmp_path / "run"
    proc = run_cli("train", "data=imagefolder", f"data.root={root}", f"data.cache_dir={tmp_path / 'c'}",
                   "model=cifar_resnet", "model.depth=8", "batch.k=2", "batch.n=8", "schedule.epochs=2",
                   "schedule.warmup_epochs=1", "schedule.milestones=[5]", "threads=1", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    assert len([x for x in (run / "metrics.jsonl").read_text().splitlines() if "val/err" in x]) == 2
    # the paper's zero-gamma with option-A shortcuts: the header says which channels it leaves dead (Table 2b)
    assert "warning: zero-gamma with option-A (zero-padded) shortcuts leaves 16 of 32 channels of layer2, 48 of 64 " \
           "channels of layer3 at exactly 0" in proc.stdout


@pytest.mark.slow
def test_config_tree_ships_in_the_wheel(tmp_path):
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheel_dir), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(wheel_dir.glob("lbsgd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "lbsgd_cli/conf/train.yaml" in names and "lbsgd_cli/conf/experiment/imagenet_8k_gradual.yaml" in names
    assert "lbsgd_cli/report/command.py" in names  # lbsgd plot's package
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-m", "lbsgd_cli", "train", "--cfg", "job", "model=resnet50"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "arch: resnet50" in out.stdout
    where = subprocess.run([sys.executable, "-c", "from lbsgd_cli.cli import conf_dir; print(conf_dir())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip().startswith(str(site))


@pytest.mark.slow  # three trainings, one with the compiled fused kernel
def test_channels_last_and_fused_bn_kernel_train_the_same_network(tmp_path):
    """model.channels_last=true (NHWC model and inputs) and model.bn_kernel=fused (one compiled ghost-BN
    kernel per layer): each the same run as the default up to summation order (not bit-identical)."""
    args = [*SHORT, "schedule.epochs=1", "batch.k=2", "batch.n=32"]
    runs = {"default": [], "nhwc": ["model.channels_last=true"], "fused": ["model.bn_kernel=fused"]}
    out = {}
    for name, extra in runs.items():
        proc = run_cli("train", f"hydra.run.dir={tmp_path / name}", *args, *extra)
        assert proc.returncode == 0, proc.stderr
        out[name] = proc.stdout
    ref = _weights(tmp_path / "default")
    for name in ("nhwc", "fused"):
        w = _weights(tmp_path / name)
        assert all(torch.allclose(ref[k].float(), w[k].float(), rtol=1e-3, atol=1e-4) for k in ref), name
        assert any(not torch.equal(ref[k], w[k]) for k in ref if ref[k].is_floating_point()), name
    assert any(v.dim() == 4 and v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous()
               for v in _weights(tmp_path / "nhwc").values())  # the saved weights are NHWC: really converted
    assert "bn_kernel: fused" in (tmp_path / "fused" / "config.yaml").read_text()
    assert "ghost BN over n = 32 (model.bn_kernel=fused)" in out["fused"]
    assert "compile: the first step took" in out["fused"] and "compile:" not in out["default"]


@pytest.mark.slow  # three trainings
def test_stop_after_epoch_is_a_probe_that_the_same_command_continues(tmp_path):
    """checkpoint.stop_after_epoch: the run's first epochs (a probe), exit 0 and no summary; the command without
    it continues the same run to the weights of a run never stopped (it changes nothing in the result)."""
    args = [*SHORT, "batch.k=2", "schedule.epochs=3"]
    ref, run = tmp_path / "ref", tmp_path / "probe"
    assert lbsgd("train", f"hydra.run.dir={ref}", *args).returncode == 0
    probe = lbsgd("train", f"hydra.run.dir={run}", *args, "checkpoint.stop_after_epoch=2")
    assert probe.returncode == 0, probe.stderr
    assert "stopped after epoch 2 of 3" in probe.stdout and not (run / "summary.json").exists()
    assert sum('"val/err"' in line for line in (run / "metrics.jsonl").read_text().splitlines()) == 2
    again = lbsgd("train", f"hydra.run.dir={run}", *args, "checkpoint.stop_after_epoch=2")  # nothing left to probe
    assert again.returncode == 0 and "stopped after epoch 2 of 3" in again.stdout
    rest = lbsgd("train", f"hydra.run.dir={run}", *args)
    assert rest.returncode == 0, rest.stderr
    assert "resuming at iteration" in rest.stdout and (run / "summary.json").exists()
    assert "stop_after_epoch: 0" in (run / "config.yaml").read_text()  # the config of the run's last start
    a, b = _weights(ref), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not predicate():
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the signal"


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_exits_3_and_the_same_command_resumes(tmp_path):
    run, args = tmp_path / "run", [*SHORT, "schedule.epochs=6", "log.tensorboard=false"]
    err = tmp_path / "err.txt"
    with open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "lbsgd_cli", "train", f"hydra.run.dir={run}", *args], cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=stderr)
        metrics = run / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and '"iter": 30' in metrics.read_text(), proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 3
    lines = err.read_text().strip().splitlines()
    assert lines[0].startswith("lbsgd: Ctrl-C: writing a checkpoint at the next iteration")
    assert lines[-1].startswith("lbsgd: preempted: stopped by SIGINT (Ctrl-C) at iteration ") and len(lines) == 2
    stopped = int(lines[-1].split("at iteration ")[1].split(";")[0])
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["iteration"] == stopped >= 30
    resumed = run_cli("train", f"hydra.run.dir={run}", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at iteration {stopped}" in resumed.stdout


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tmp_path):
    """The run hangs at iteration 5 (test fault injection) so that the first Ctrl-C's checkpoint never comes."""
    run, err = tmp_path / "run", tmp_path / "err.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LBSGD_FAULT_RANK": "0", "LBSGD_FAULT_KIND": "hang",
           "LBSGD_FAULT_ITER": "5"}
    with open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "lbsgd_cli", "train", f"hydra.run.dir={run}", *SHORT],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _wait_for(lambda: "fault injection" in err.read_text(), proc)
        proc.send_signal(signal.SIGINT)
        _wait_for(lambda: "Ctrl-C: writing a checkpoint" in err.read_text(), proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    assert err.read_text().strip().splitlines()[-1].startswith("lbsgd: interrupted: stopped at once")
    assert not (run / "checkpoints" / "last.pt").exists()  # hung before the first checkpoint: none was written


def test_fp16_on_a_cpu_warns_in_the_header_naming_bf16_and_the_measured_slowdown(tmp_path):
    args = [*SHORT, "schedule.epochs=1", "data.train_subset=256", "log.tensorboard=false", "model.width=8"]
    proc = lbsgd("train", *args, "precision=fp16", f"hydra.run.dir={tmp_path / 'fp16'}")
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stdout.splitlines() if line.startswith("warning: precision=fp16")]
    assert len(warning) == 1 and "use precision=bf16" in warning[0] and "x slower than fp32" in warning[0]
    proc = lbsgd("train", *args, "precision=bf16", "threads=1", f"hydra.run.dir={tmp_path / 'bf16'}")
    assert proc.returncode == 0 and "warning: precision=fp16" not in proc.stdout
    assert "on 1 process(es) of 1 CPU thread(s) (threads=1)" in proc.stdout  # the header says how many cores it takes


