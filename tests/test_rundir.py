"""The run directory: the lock held for a run's life, the state a checkpoint carries, the config check."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time

import pytest
import torch

from lbsgd_cli.rundir import RunLock, RunState, config_difference, zero_sums

from .conftest import ROOT, SHORT, run_cli

_HOLD = """
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
f.write(f"pid {os.getpid()} on host elsewhere\\n"); f.flush()
print("locked", flush=True)
time.sleep(600)
"""


def _hold_in_another_process(lock_file):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(lock_file)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_held_lock_refuses_a_second_holder_with_host_and_pid(tmp_path):
    first, second = RunLock(tmp_path / "run"), RunLock(tmp_path / "run")
    assert first.acquire() is None
    first.claim()
    refused = second.acquire()
    assert refused == (f"run directory {tmp_path / 'run'} is in use by pid {os.getpid()} on host {platform.node()}; "
                       "wait for that run to end or choose another hydra.run.dir")
    first.release()
    assert second.acquire() is None  # released at the end of a run: the next start takes it
    second.release()


def test_a_lock_held_by_another_process_refuses_and_one_left_by_a_killed_process_does_not_block(tmp_path):
    lock = RunLock(tmp_path / "run")
    (tmp_path / "run").mkdir()
    holder = _hold_in_another_process(lock.path)
    try:
        assert f"is in use by pid {holder.pid} on host elsewhere" in lock.acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # no chance to clean up: the file stays, with its text
        holder.wait()
    assert lock.path.read_text().startswith(f"pid {holder.pid}")
    assert lock.acquire() is None  # the OS dropped the dead process's flock
    lock.release()


def test_run_state_round_trips_through_a_checkpoint():
    state = RunState(iteration=7, epoch=1, iter_in_epoch=3, epoch_sums={"loss": 2.0, "correct": 5.0, "count": 9.0},
                     last_val={"top1_err": 0.5}, elapsed_s=1.5)
    ckpt = {**vars(state), "model": {}, "rng": {}}
    assert RunState.from_checkpoint(ckpt, is_main=True) == state
    assert RunState.from_checkpoint(ckpt, is_main=False).epoch_sums == zero_sums()  # rank 0 carries the sums
    old = {"iteration": 7, "epoch": 1, "iter_in_epoch": 3}  # a checkpoint from before elapsed_s and sums
    assert RunState.from_checkpoint(old, is_main=True) == RunState(7, 1, 3)


def test_config_difference_takes_added_keys_at_their_schema_default():
    assert config_difference({}, {"data": {"val_subset": 0}}) is None
    assert config_difference({}, {"data": {"val_subset": 500}}) == "data.val_subset: None -> 500"
    assert config_difference({"a": 1}, {"a": 2}, ignored=("a",)) is None


@pytest.mark.slow
def test_two_starts_on_one_run_directory(tmp_path):
    """The new user's experience: the second `lbsgd train` on a running run's directory is refused at once
    with one line, and the first run goes on undisturbed (here until it is preempted)."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [f"hydra.run.dir={run}", *SHORT, "schedule.epochs=500"]  # runs until it is stopped below
    first = subprocess.Popen([sys.executable, "-m", "lbsgd_cli", "train", *args],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, lock = time.monotonic() + 120, run / ".lock"
        while not (lock.exists() and lock.read_text()):  # the first start has claimed the directory
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.05)
        second = run_cli("train", *args)
        assert second.returncode == 2 and second.stderr.strip().count("\n") == 0, second.stderr
        assert f"is in use by pid {first.pid} on host {platform.node()}" in second.stderr
        assert first.poll() is None  # still training
    finally:
        first.send_signal(signal.SIGTERM)  # preemption: a checkpoint at the next iteration, exit 3
        out, err = first.communicate(timeout=120)
    assert first.returncode == 3 and "preempted" in err, (out, err)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=False)["iteration"] > 0
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1  # one writer, one event file
