"""Preemption at any moment: signals caught from the process's start and turned into a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lbsgd_cli.preemption import PreemptionFlag, catch_early, early_signal, forget_early

from .conftest import ROOT, SHORT


@pytest.fixture
def early():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    yield
    forget_early()
    assert {s: signal.getsignal(s) for s in before} == before  # the test process gets its handlers back


def test_a_signal_during_start_up_is_remembered_and_the_loops_flag_takes_it_over(early):
    catch_early()
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0.01)
    assert early_signal() == "SIGUSR2"
    flag = PreemptionFlag(["SIGTERM", "SIGUSR2"], check_every=10)
    try:
        assert flag.raised == "SIGUSR2" and flag.agreed(torch.device("cpu"))
    finally:
        flag.restore()


def test_only_the_first_start_up_signal_counts(early):
    catch_early()
    os.kill(os.getpid(), signal.SIGUSR2)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    assert early_signal() == "SIGUSR2"


def test_no_start_up_signal_leaves_the_flag_down(early):
    catch_early()
    flag = PreemptionFlag(["SIGTERM", "SIGUSR2"])
    try:
        assert flag.raised is None and not flag.agreed(torch.device("cpu"))
    finally:
        flag.restore()


def test_a_start_up_signal_the_config_does_not_treat_as_preemption_acts_as_it_would_have():
    """checkpoint.preempt_signals=[SIGUSR2]: a SIGTERM caught early ends the process as SIGTERM does."""
    code = ("import os, signal, time\n"
            "from lbsgd_cli.preemption import PreemptionFlag, catch_early\n"
            "catch_early(); os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.01)\n"
            "PreemptionFlag(['SIGUSR2'])\n"
            "print('survived')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == -signal.SIGTERM and "survived" not in proc.stdout


@pytest.mark.slow
def test_sigusr2_while_lbsgd_train_imports_writes_a_checkpoint_exits_3_and_resumes_to_the_same_weights(tmp_path):
    """The signal lands while Python imports torch (a SLURM preemption at a job's start): before, the process
    died of it (SLURM: FAILED, status 4, no requeue)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lbsgd_cli", "train", *SHORT, "log.tensorboard=false", "log.progress=plain"]
    proc = subprocess.Popen([*cmd, f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.5)  # python is up, torch not yet imported
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err
    assert "SIGUSR2 during start-up" in err and "preempted by SIGUSR2 at iteration" in err
    again = subprocess.run([*cmd, f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, text=True,
                           capture_output=True, timeout=300)
    assert again.returncode == 0 and "resuming at iteration" in again.stdout, again.stderr
    ref = subprocess.run([*cmd, f"hydra.run.dir={tmp_path / 'ref'}"], cwd=ROOT, env=env, text=True,
                         capture_output=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    w_run = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["model"]
    w_ref = torch.load(tmp_path / "ref" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)


def test_the_first_sigint_sets_the_preemption_flag_and_a_second_raises_keyboard_interrupt(capsys):
    before = signal.getsignal(signal.SIGINT)
    flag = PreemptionFlag(["SIGTERM"])
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert flag.raised == "SIGINT" and flag.agreed(torch.device("cpu"))
        assert "Ctrl-C again stops at once" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGINT) == before
