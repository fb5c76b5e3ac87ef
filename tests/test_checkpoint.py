"""Checkpoints hold data only (``torch.load(weights_only=True)``: a hostile pickle runs no code), old ones
still load, and a full disk keeps the previous checkpoint and exits 6; the same command then resumes."""

from __future__ import annotations

import errno
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from torch.torch_version import TorchVersion

from lbsgd_cli import checkpoint
from lbsgd_cli.errors import UserError

from .conftest import SHORT, lbsgd

FAST = [*SHORT, "log.tensorboard=false", "model.width=8"]


class Payload:
    """A pickle that would create ``target`` when unpickled (``os.system`` of ``touch``)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def hostile_checkpoint(path: Path, target: Path) -> Path:
    """A file shaped like an lbsgd checkpoint whose model state is a payload."""
    torch.save({"format": checkpoint.FORMAT, "model": Payload(target), "config": {}, "meta": {}}, path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ckpt") / "run"
    assert lbsgd("train", *FAST, f"hydra.run.dir={run}").returncode == 0
    return run


def test_every_checkpoint_lbsgd_writes_is_plain_data(trained, tmp_path):
    """torch.load with weights_only=True and no allowlist reads a training and a quantized checkpoint."""
    ckpt = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["format"] == checkpoint.FORMAT and type(ckpt["meta"]["torch"]) is str
    assert isinstance(ckpt["rng"]["python"], tuple) and torch.is_tensor(ckpt["rng"]["torch"])
    out = tmp_path / "q"
    proc = lbsgd("quantize", f"checkpoint={trained / 'checkpoints' / 'last.pt'}", "quant.bits=4",
                 f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    q = torch.load(out / "quantized.pt", weights_only=True)
    assert q["format"] == "lbsgd-quantized-v1" and type(q["meta"]["torch"]) is str


def test_a_hostile_checkpoint_runs_no_code_in_train_eval_or_quantize(trained, tmp_path):
    target = tmp_path / "PWNED"
    evil = hostile_checkpoint(tmp_path / "evil.pt", target)
    for command in ("eval", "quantize"):
        proc = lbsgd(command, f"checkpoint={evil}", f"hydra.run.dir={tmp_path / command}")
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"lbsgd: error: checkpoint: {evil} holds code") and proc.stderr.count("\n") == 1
        assert "posix.system" in proc.stderr and not target.exists()
    run = tmp_path / "resume"  # a run directory whose last.pt was replaced: `lbsgd train` resumes from it
    (run / "checkpoints").mkdir(parents=True)
    hostile_checkpoint(run / "checkpoints" / "last.pt", target)
    proc = lbsgd("train", *FAST, f"hydra.run.dir={run}")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "holds code" in proc.stderr
    assert not target.exists()


def test_eval_and_quantize_refuse_a_data_root_for_a_digits_checkpoint_rather_than_ignore_it(trained, tmp_path):
    last = trained / "checkpoints" / "last.pt"
    for command, key in (("eval", "data.root"), ("quantize", "data_root")):
        proc = lbsgd(command, f"checkpoint={last}", f"{key}=/nonexistent", f"hydra.run.dir={tmp_path / command}")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith(f"lbsgd: error: {key}: has no meaning for data=digits")
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_written_before_the_rule_still_loads(trained, tmp_path):
    """Before, ``meta.torch`` was ``torch.__version__`` (a TorchVersion): the one allowlisted type."""
    ckpt = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    ckpt["meta"]["torch"] = TorchVersion(torch.__version__)
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    with pytest.raises(Exception):  # without the allowlist weights_only refuses it
        torch.load(old, weights_only=True)
    assert checkpoint.load_checkpoint(old)["iteration"] == ckpt["iteration"]
    proc = lbsgd("eval", f"checkpoint={old}", f"hydra.run.dir={tmp_path / 'ev'}")
    assert proc.returncode == 0, proc.stderr


def test_a_full_disk_keeps_the_previous_checkpoint_exits_6_and_resumes(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) >= 2:  # the first checkpoint (epoch 1) is written, the second finds the disk full
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    proc = lbsgd("train", *FAST, f"hydra.run.dir={run}")
    assert proc.returncode == 6, proc.stderr
    assert proc.stderr.startswith("lbsgd: error: cannot write checkpoint") and proc.stderr.count("\n") == 1
    assert "the disk is full" in proc.stderr and "is kept" in proc.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.pt"]  # no temporary file left behind
    kept = checkpoint.load_checkpoint(run / "checkpoints" / "last.pt")
    assert kept["epoch"] == 1 and kept["iter_in_epoch"] == 0
    monkeypatch.setattr(checkpoint.torch, "save", real_save)  # space freed
    again = lbsgd("train", *FAST, f"hydra.run.dir={run}")
    assert again.returncode == 0, again.stderr
    assert f"resuming at iteration {kept['iteration']}" in again.stdout
    assert checkpoint.load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 3


def test_a_full_disk_under_the_metrics_keeps_the_checkpoint_before_it_and_loses_no_record(tmp_path, monkeypatch):
    """metrics.jsonl cannot take a record: the next checkpoint is not written (it would follow the lost
    record), the run exits 6 with one line, and the same command resumes and writes the lost records again."""
    from lbsgd_cli import metrics

    run, real_open, written = tmp_path / "run", open, []

    class FullDisk:
        def __init__(self, f) -> None:
            self.f = f

        def write(self, text: str) -> int:
            written.append(text)
            if len(written) > 12:  # after epoch 1's records (its checkpoint is written)
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def close(self) -> None:
            self.f.close()

    monkeypatch.setattr(metrics, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
    proc = lbsgd("train", *FAST, "log.every=1", f"hydra.run.dir={run}")
    assert proc.returncode == 6, proc.stderr
    assert proc.stderr.startswith(f"lbsgd: error: cannot write {run / 'metrics.jsonl'}: the disk is full; the "
                                  "checkpoint") and proc.stderr.count("\n") == 1 and "is kept" in proc.stderr
    kept = checkpoint.load_checkpoint(run / "checkpoints" / "last.pt")
    assert kept["epoch"] == 1
    monkeypatch.setattr(metrics, "open", real_open, raising=False)  # space freed
    again = lbsgd("train", *FAST, "log.every=1", f"hydra.run.dir={run}")
    assert again.returncode == 0, again.stderr
    records = metrics.read_metrics(run / "metrics.jsonl")
    iters = [r["iter"] for r in records if "iter" in r]
    assert iters == list(range(1, iters[-1] + 1))  # every iteration once, none lost, none twice
    assert [r["epoch"] for r in records if "val/err" in r] == [1, 2, 3]


def test_read_checkpoint_refuses_globals_with_one_line(tmp_path):
    evil = hostile_checkpoint(tmp_path / "evil.pt", tmp_path / "PWNED")
    with pytest.raises(UserError, match="refused without running any of it") as info:
        checkpoint.read_checkpoint(evil)
    assert "\n" not in str(info.value) and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_raw_pickle_checkpoint_is_refused_in_one_line_with_no_warning_before_it(tmp_path, protocol):
    raw = tmp_path / "raw.pkl"  # pickle.dump of what a checkpoint holds, not torch.save
    raw.write_bytes(pickle.dumps({"format": checkpoint.FORMAT, "model": {"w": [1.0]}}, protocol=protocol))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match="is not a readable checkpoint") as info:
            checkpoint.read_checkpoint(raw)
    assert [str(w.message) for w in caught] == [] and "\n" not in str(info.value)


def test_a_real_full_file_system_keeps_the_previous_checkpoint(tmp_path):
    """A 512 KiB tmpfs (mounting needs root; skipped elsewhere): the second, larger checkpoint does not fit."""
    import subprocess

    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        first = {"model": torch.arange(40_000, dtype=torch.float32)}  # 160 KB
        checkpoint.atomic_save(first, mnt / "last.pt")
        with pytest.raises(checkpoint.CheckpointWriteError, match="the disk is full; the previous checkpoint .* is kept"):
            checkpoint.atomic_save({"model": torch.zeros(100_000)}, mnt / "last.pt")  # 400 KB: no room beside it
        assert [p.name for p in mnt.iterdir()] == ["last.pt"]
        assert torch.equal(checkpoint.read_checkpoint(mnt / "last.pt")["model"], first["model"])
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
