"""The ``lbsgd`` command in this process (the fast tier): every bad input is one line and exit 2,
the help and the composed config print, a short run trains and a locked run directory is refused."""

from __future__ import annotations

import json
import os
import platform

import pytest
from omegaconf import OmegaConf

from lbsgd_cli import cli, sweep
from lbsgd_cli.rundir import RunLock

from .conftest import SHORT, lbsgd


def _one_line_exit_2(proc, needle: str) -> None:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert err.startswith("lbsgd: error:") and "\n" not in err and needle in err, err
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("args,needle", [
    (["batch.nope=1"], "unknown config key 'batch.nope'"),
    (["batch.k=0"], "batch.k"),
    (["batch.n=-2"], "batch.n"),
    (["schedule.warmup=linear"], "schedule.warmup"),
    (["batch.k=abc"], "batch.k"),
    (["model=resnet51"], "model/resnet51"),
    (["batch.k=100"], "larger than the training set"),
    (["data=imagefolder", "data.root=/no/such/dir"], "/no/such/dir does not exist"),
    (["data=imagefolder"], "data.root"),
    (["optim.base_lr=nan"], "optim.base_lr: must be a finite number, got nan"),
    (["optim.base_lr=inf"], "optim.base_lr: must be a finite number, got inf"),
    (["schedule.gamma=-inf"], "schedule.gamma: must be a finite number"),
    (["optim.momentum=nan"], "optim.momentum: must be a finite number"),
    (["dist.timeout_s=nan"], "dist.timeout_s: must be a finite number"),
    (["precision=fp8"], "precision"),
    (["model.bn_kernel=cudnn"], "model.bn_kernel"),
    (["dist.comm_hook=int8"], "dist.comm_hook"),
    (["device=tpu"], "device"),
    (["log.progress=fancy"], "log.progress"),
    (["optim.name=lars"], "optim.name: choose the optimizer with its group"),
    (["offload.mode=sequential"], "offload.mode: sequential cannot be used in training"),
    (["batch.k=3,nan"], "batch.k"),  # a sweep: every value is checked before anything runs
    (["-m", "optim.base_lr=0.1,nan"], "optim.base_lr: must be a finite number"),
    (["checkpoint.preempt_signals=[SIGNOPE]"], "checkpoint.preempt_signals: unknown signal 'SIGNOPE'"),
    (["data.root=/nonexistent"], "data.root: has no meaning for data=digits"),  # digits read no folder
    (["data.root=/nonexistent"], "data=imagefolder, cifar10, cifar100 read it"),
    (["model.arch=foo"], "model.arch: unknown network 'foo'"),  # the name first, not "foo expects RGB images"
    (["model.arch=resnet18"], "model.arch: resnet18 expects RGB images, the data has 1 channel(s)"),
])
def test_bad_train_input_is_one_line_exit_2_and_leaves_nothing_behind(args, needle, tmp_path):
    _one_line_exit_2(lbsgd("train", "threads=1", f"hydra.run.dir={tmp_path / 'run'}", *args), needle)
    assert list(tmp_path.iterdir()) == []  # no run directory, no .lock: the refusal wrote nothing


@pytest.mark.parametrize("command,args,needle", [
    ("eval", [], "checkpoint: give the checkpoint to evaluate"),
    ("eval", ["checkpoint=/no/such.pt"], "checkpoint: /no/such.pt does not exist"),
    ("eval", ["checkpoint=x.pt", "eval.bn_recompute=-1"], "eval.bn_recompute"),
    ("eval", ["checkpoint=x.pt", "offload.mode=disk"], "offload.mode"),
    ("quantize", [], "checkpoint: is required"),
    ("quantize", ["checkpoint=x.pt", "quant.percentile=nan"], "quant.percentile: must be a finite number"),
    ("quantize", ["checkpoint=x.pt", "quant.bits=1"], "quant.bits"),
    ("quantize", ["checkpoint=/no/such.pt"], "checkpoint: /no/such.pt does not exist"),
])
def test_bad_eval_and_quantize_input_is_one_line_exit_2_and_leaves_nothing_behind(command, args, needle, tmp_path):
    _one_line_exit_2(lbsgd(command, f"hydra.run.dir={tmp_path / 'run'}", *args), needle)
    assert list(tmp_path.iterdir()) == []


def test_a_refusal_removes_the_folders_it_made_and_keeps_what_was_there_before(tmp_path):
    new = tmp_path / "a" / "b" / "run"  # three folders Hydra makes for the call: all go
    _one_line_exit_2(lbsgd("eval", f"hydra.run.dir={new}", "checkpoint=/no/such.pt"), "does not exist")
    assert list(tmp_path.iterdir()) == []
    empty = tmp_path / "empty"  # a folder that was there, empty: it stays
    empty.mkdir()
    _one_line_exit_2(lbsgd("quantize", f"hydra.run.dir={empty}", "checkpoint=/no/such.pt"), "does not exist")
    assert empty.is_dir() and list(empty.iterdir()) == []
    run = tmp_path / "run"  # a run directory with a log but no checkpoint: train refuses it, no .lock left
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    _one_line_exit_2(lbsgd("train", f"hydra.run.dir={run}", *SHORT), "has metrics.jsonl but no checkpoint")
    assert [p.name for p in run.iterdir()] == ["metrics.jsonl"]


def test_a_sweep_with_a_point_that_cannot_run_is_refused_whole_naming_it_before_any_point_runs(tmp_path):
    proc = lbsgd("train", "-m", "batch.k=1000,2", "threads=1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    _one_line_exit_2(proc, "sweep point batch.k=1000: batch: k*n = 32000 is larger than the training set "
                           "(1437 images); no point of the sweep ran")
    assert list(tmp_path.iterdir()) == []  # not even the valid point batch.k=2 ran
    proc = lbsgd("train", "-m", "model.arch=small_cnn,resnet18", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    _one_line_exit_2(proc, "sweep point model.arch=resnet18: model.arch: resnet18 expects RGB images")
    proc = lbsgd("train", "-m", "batch.k=2,4", "optim.base_lr=0.1,nan", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    _one_line_exit_2(proc, "sweep point batch.k=2,optim.base_lr=nan: optim.base_lr: must be a finite number")
    assert list(tmp_path.iterdir()) == []


def test_sweep_points_are_hydras_jobs_the_command_line_replacing_a_presets_values():
    jobs = sweep.points(["batch.k=2,4", "seed=0,1", "threads=1"], {"batch.k": "8,16,32", "optim.base_lr": "0.1,0.2"})
    assert len(jobs) == 2 * 2 * 2
    assert jobs[0].overrides == ["batch.k=2", "optim.base_lr=0.1", "seed=0", "threads=1"]
    assert jobs[0].label == "batch.k=2,optim.base_lr=0.1,seed=0"
    assert jobs[-1].label == "batch.k=4,optim.base_lr=0.2,seed=1"


def test_unknown_command_and_usage():
    proc = lbsgd("fly")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "lbsgd: error: unknown command 'fly' (commands: train, quantize, eval, plot, plan)"
    usage = lbsgd()
    assert usage.returncode == 2 and "train" in usage.stdout and "quantize" in usage.stdout


def test_every_command_is_one_line_of_one_table_that_the_usage_lists():
    assert list(cli.COMMANDS) == ["train", "quantize", "eval", "plot", "plan"]
    usage = lbsgd("--help")
    assert usage.returncode == 0
    for name, command in cli.COMMANDS.items():
        assert f"\n  {name} " in usage.stdout and command.help in usage.stdout
        assert (command.task is None) != (command.main is None), f"{name}: a Hydra task or a plain main, not both"
    plot = lbsgd("plot", "--help")  # plot, a plain command, runs through the table too
    assert plot.returncode == 0 and "RUN_OR_SWEEP_DIR" not in plot.stderr and "--no-figures" in plot.stdout


def test_cfg_job_and_help():
    job = lbsgd("train", "--cfg", "job", "batch.k=256", "experiment=imagenet_8k_gradual")
    assert job.returncode == 0, job.stderr
    cfg = OmegaConf.create(job.stdout)
    assert (cfg.batch.k, cfg.model.arch, cfg.schedule.warmup, cfg.optim.base_lr, cfg.optim.ref_batch) == (
        256, "resnet50", "gradual", 0.1, 256)
    helped = lbsgd("train", "--help")
    assert helped.returncode == 0 and "experiment" in helped.stdout and "schedule" in helped.stdout


def test_run_names_leave_out_the_keys_that_do_not_change_the_result():
    def run_dir(*overrides: str, command: str = "train") -> str:
        proc = lbsgd(command, "--cfg", "hydra", "--resolve", *overrides)
        assert proc.returncode == 0, proc.stderr
        return OmegaConf.create(proc.stdout).hydra.run.dir

    # keys that named runs before still do, spelled the same way
    assert run_dir() == "runs/train/default"
    assert run_dir("batch.k=8", "schedule.warmup=constant") == "runs/train/batch.k=8,schedule.warmup=constant"
    assert run_dir("optim=lars", "precision=bf16", "seed=3") == "runs/train/optim=lars,precision=bf16,seed=3"
    assert run_dir("dist.comm_hook=fp16", "data.val_subset=10") == "runs/train/data.val_subset=10,dist.comm_hook=fp16"
    # keys that do not change the result do not (batch.eval_batch and offload.mode are new here)
    assert run_dir("batch.k=8", "batch.eval_batch=64", "offload.mode=none", "dist.requeue=true", "threads=2",
                   "memory.checkpointing=true", "log.every=1", "data.num_workers=4", "device=cpu") == \
        "runs/train/batch.k=8"
    assert run_dir("checkpoint=a/b.pt", "eval.batch=10", "threads=1", command="eval") == "runs/eval/checkpoint=a_b.pt"


def test_a_short_run_trains_and_a_second_start_is_told_it_is_complete(tmp_path):
    run = tmp_path / "run"
    proc = lbsgd("train", f"hydra.run.dir={run}", *SHORT, "schedule.epochs=1", "log.tensorboard=false")
    assert proc.returncode == 0, proc.stderr
    assert "done: val top-1 error" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["val_top1_err"] < 0.9
    again = lbsgd("train", f"hydra.run.dir={run}", *SHORT, "schedule.epochs=1", "log.tensorboard=false",
                  "batch.eval_batch=32", "threads=2")  # keys that do not change the result may change
    assert again.returncode == 0 and "already complete" in again.stdout, again.stderr
    other = lbsgd("train", f"hydra.run.dir={run}", *SHORT, "schedule.epochs=1", "optim.base_lr=0.2")
    _one_line_exit_2(other, "holds a run with another config (optim.base_lr: 0.1 -> 0.2)")


def test_a_run_directory_in_use_is_refused_naming_host_and_pid(tmp_path):
    run = tmp_path / "run"
    holder = RunLock(run)  # another start's lock (a second open file description: flock conflicts with it)
    assert holder.acquire() is None
    holder.claim()
    try:
        proc = lbsgd("train", f"hydra.run.dir={run}", *SHORT)
        _one_line_exit_2(proc, f"is in use by pid {os.getpid()} on host {platform.node()}")
        assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()
    finally:
        holder.release()
