"""Multi-process ``lbsgd train``: W-invariance, W -> W' resume, preemption, dead ranks, SLURM.

Two CPU processes talk over gloo. They are started the way ``srun`` starts tasks (SLURM_*
variables, no torchrun) or by torchrun; the results are compared with a one-process run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lbsgd_cli import distributed as D
from lbsgd_cli.config import DistConfig
from lbsgd_cli.errors import PeerFailure
from lbsgd_cli.preemption import PreemptionFlag

from .conftest import ROOT, clean_env, free_port, lbsgd, max_abs_diff, run_weights

# 768 digits, k=4 workers of n=32: 6 iterations per epoch, warmup over epoch 1, rate drop after epoch 2.
# Every run takes its workers 2 per forward pass, as each of 2 processes does (see test_w_invariance).
CFG = ["threads=1", "log.progress=plain", "log.tensorboard=false", "schedule.epochs=3", "schedule.warmup_epochs=1",
       "schedule.milestones=[2]", "batch.k=4", "batch.n=32", "batch.workers_per_pass=2", "model.width=16",
       "checkpoint.every_iters=2", "data.train_subset=768"]
ITERS = 3 * 6


def srun_like(args: list[str], logs: Path, env: dict[str, str] | None = None, world: int = 2) -> list[subprocess.Popen]:
    """Start ``world`` ranks of ``lbsgd train`` as ``srun`` would: SLURM_PROCID/NTASKS/LOCALID, node list, job id."""
    job = free_port() - 20000
    (logs / "job").write_text(str(job))
    procs = []
    for rank in range(world):
        slurm = {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": str(world),
                 "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_JOB_ID": str(job)}
        out = open(logs / f"rank{rank}.out", "w")
        err = open(logs / f"rank{rank}.err", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "lbsgd_cli", "train", *args], cwd=ROOT,
                                      env=clean_env(**slurm, **(env or {})), stdout=out, stderr=err))
    return procs


def train(run: Path, args: list[str], processes: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """``lbsgd train`` in ``run``: one plain process, or ``processes`` gloo processes under torchrun."""
    launch = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={free_port()}"]
    return subprocess.run([sys.executable, *(launch if processes > 1 else []), "-m", "lbsgd_cli", "train",
                           f"hydra.run.dir={run}", *args], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def _wait_for_checkpoint(path: Path, at_least: int, procs, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a rank ended before the signal"
        try:
            if path.exists() and torch.load(path, weights_only=False)["iteration"] >= at_least:
                return
        except Exception:  # being replaced
            pass
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_w2_equals_w1_resumes_across_w_and_survives_preemption(tmp_path):
    """(a) W=2 ends with the weights of W=1; (b) a W=2 checkpoint resumes on W=1; (c) SIGUSR2 on one rank:
    checkpoint, exit 3 'preempted', SLURM requeue by rank 0, and the same command resumes exactly."""
    bin_dir = tmp_path / "bin"  # a fake scontrol records the requeue
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    (bin_dir / "scontrol").chmod(0o755)

    ref, run = tmp_path / "ref", tmp_path / "w2"
    ref_proc = subprocess.Popen([sys.executable, "-m", "lbsgd_cli", "train", f"hydra.run.dir={ref}", *CFG],
                                cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    args = [f"hydra.run.dir={run}", *CFG, "dist.requeue=true"]
    procs = srun_like(args, tmp_path, env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    _wait_for_checkpoint(run / "checkpoints" / "last.pt", 4, procs)
    procs[1].send_signal(signal.SIGUSR2)  # one rank is told; both must stop at the same iteration
    codes = [p.wait(timeout=180) for p in procs]  # generous: a loaded 2-core machine (CI)
    errs = [(tmp_path / f"rank{r}.err").read_text() for r in (0, 1)]
    assert codes == [3, 3], errs
    assert "lbsgd: preempted: preempted by SIGUSR2 at iteration" in errs[1]
    assert "preempted by a signal on another rank" in errs[0] and "requeued with `scontrol requeue" in errs[0]
    job = (tmp_path / "job").read_text()
    calls = [c for c in (tmp_path / "scontrol.log").read_text().splitlines() if c.startswith("requeue")]
    assert calls == [f"requeue {job}"]  # once, by rank 0 only
    stopped = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert 4 <= stopped["iteration"] < ITERS and stopped["meta"]["world_size"] == 2
    out0, out1 = (tmp_path / "rank0.out").read_text(), (tmp_path / "rank1.out").read_text()
    assert "lbsgd train:" in out0 and out1 == ""  # only rank 0 prints

    out, err = ref_proc.communicate(timeout=180)
    assert ref_proc.returncode == 0, err

    # (b) the W=2 checkpoint finishes on one process, (c) the same command finishes on two (torchrun)
    on_w1 = tmp_path / "w2_then_w1"
    shutil.copytree(run, on_w1)
    w1_proc = subprocess.Popen([sys.executable, "-m", "lbsgd_cli", "train", f"hydra.run.dir={on_w1}", *CFG],
                               cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            f"--master_port={free_port()}", "-m", "lbsgd_cli", "train", *args],
                           cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    w1_out, w1_err = w1_proc.communicate(timeout=180)
    assert w1_proc.returncode == 0, w1_err
    assert f"resuming at iteration {stopped['iteration']}" in w1_out

    # only rank 0 printed the header, the progress and the epoch lines
    assert again.stdout.count("lbsgd train:") == 1 and again.stdout.count("epoch 3/3") == 1
    assert f"resuming at iteration {stopped['iteration']}" in again.stdout
    starts = json.loads((run / "run_info.json").read_text())["starts"]
    assert [(s["world_size"], s["launcher"]) for s in starts] == [(2, "slurm"), (2, "torchrun")]

    assert max_abs_diff(ref, run) <= 1e-5  # W=2 (preempted, resumed) == W=1 uninterrupted
    assert max_abs_diff(ref, on_w1) <= 1e-5  # W=2 then W=1 == W=1
    w_ref, w_run = run_weights(ref), run_weights(run)
    assert all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)  # in fact bit for bit (same passes, see README)
    epochs = [[json.loads(x)["val/err"] for x in (d / "metrics.jsonl").read_text().splitlines() if "val/err" in x]
              for d in (ref, run, on_w1)]
    assert epochs[0] == epochs[1] == epochs[2] and len(epochs[0]) == 3


@pytest.mark.slow
def test_a_dead_or_a_hung_rank_ends_the_other_within_the_timeout(tmp_path):
    """Rank 1 crashes (one pair of processes) or hangs (another pair) before iteration 3; rank 0 of each
    pair exits with status 4 and one line naming the failure: at once, or after dist.timeout_s."""
    runs = {}
    for kind in ("crash", "hang"):
        logs = tmp_path / kind
        logs.mkdir()
        args = [f"hydra.run.dir={logs / 'run'}", *CFG, "dist.timeout_s=3"]
        fault = {"LBSGD_FAULT_RANK": "1", "LBSGD_FAULT_ITER": "3", "LBSGD_FAULT_KIND": kind}
        runs[kind] = (logs, srun_like(args, logs, env=fault))
    t_fault, waited = {}, {}
    try:
        deadline = time.monotonic() + 150
        while len(waited) < len(runs) and time.monotonic() < deadline:
            for kind, (logs, procs) in runs.items():
                if kind not in t_fault and "fault injection" in (logs / "rank1.err").read_text():
                    t_fault[kind] = time.monotonic()
                if kind not in waited and procs[0].poll() is not None:
                    assert "fault injection" in (logs / "rank1.err").read_text(), (logs / "rank0.err").read_text()
                    waited[kind] = time.monotonic() - t_fault.setdefault(kind, time.monotonic())
            time.sleep(0.05)
        assert len(waited) == len(runs), "rank 0 still running"
    finally:
        for _, procs in runs.values():
            for p in procs:
                if p.poll() is None:
                    p.kill()  # the hung rank: what a launcher (srun --kill-on-bad-exit, torchrun) does
                    p.wait()
    for kind, (logs, procs) in runs.items():
        err = (logs / "rank0.err").read_text().strip()
        assert procs[0].returncode == PeerFailure.exit_code, err
        assert err.startswith("lbsgd: error: distributed: rank 0 of 2 at iteration 3:") and "\n" not in err, err
    crash_err = (runs["crash"][0] / "rank0.err").read_text()
    assert "lost the connection to rank 1 (it crashed" in crash_err and runs["crash"][1][1].returncode == 70
    assert "waited more than dist.timeout_s=3 s for rank 1" in (runs["hang"][0] / "rank0.err").read_text()
    assert waited["crash"] < 15 and waited["hang"] < 25  # bounded: no rank waits forever


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize("nodelist,hosts", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("a1,b[2-3]", ["a1", "b2", "b3"]),
    ("gpu5", ["gpu5"]),
    ("r[1-2]n[08-09],x-ib", ["r1n08", "r1n09", "r2n08", "r2n09", "x-ib"]),
    ("dgx-[9-10]-ib", ["dgx-9-ib", "dgx-10-ib"]),
])
def test_slurm_nodelist_forms(nodelist, hosts):
    assert D.expand_slurm_nodelist(nodelist) == hosts


def test_launch_env_from_slurm_torchrun_and_nothing():
    slurm = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "123456",
             "SLURM_JOB_NODELIST": "node[01-03,07]", "SLURM_STEP_NODELIST": "node[03,07]"}
    le = D.launch_env(slurm)
    assert (le.rank, le.local_rank, le.world_size, le.launcher) == (5, 1, 8, "slurm")
    assert le.master_addr == "node03" and le.master_port == 20000 + 123456 % 20000  # the step's first node
    assert D.launch_env({**slurm, "MASTER_PORT": "1234"}).master_port == 1234
    assert D.launch_env({**slurm, "SLURM_NTASKS": "1"}).launcher == "single"  # sbatch without srun
    tr = D.launch_env({**slurm, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                       "MASTER_PORT": "29400"})
    assert (tr.rank, tr.world_size, tr.master_addr, tr.master_port, tr.launcher) == (1, 2, "h", 29400, "torchrun")
    assert D.launch_env({}).launcher == "single"


def test_requeue_command_and_runner():
    assert D.requeue_command({"SLURM_JOB_ID": "42"}) == ["scontrol", "requeue", "42"]
    assert D.requeue_command({"SLURM_JOB_ID": "43", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "3"}) == [
        "scontrol", "requeue", "40_3"]
    assert D.requeue_command({}) is None
    calls, state = [], ["RUNNING"]

    def fake(cmd, **kw):
        calls.append(cmd)
        if cmd[1] == "show":
            return subprocess.CompletedProcess(cmd, 0, f"JobId=42 JobName=lbsgd JobState={state[0]} Reason=None\n", "")
        requeues = sum(c[1] == "requeue" for c in calls)
        return subprocess.CompletedProcess(cmd, 0 if requeues == 1 else 1, "", "Invalid job id specified\n")

    assert D.requeue_slurm_job({"SLURM_JOB_ID": "42"}, runner=fake) == "requeued with `scontrol requeue 42`"
    assert "failed (Invalid job id specified)" in D.requeue_slurm_job({"SLURM_JOB_ID": "42"}, runner=fake)
    assert calls == [["scontrol", "show", "job", "-o", "42"], ["scontrol", "requeue", "42"]] * 2
    assert "not a SLURM job" in D.requeue_slurm_job({}, runner=fake) and len(calls) == 4
    for state[0] in ("COMPLETING", "CANCELLED"):  # `scancel` (SIGTERM): the user stops the job; no requeue
        assert D.requeue_slurm_job({"SLURM_JOB_ID": "42"}, runner=fake) == (
            f"not requeued: job 42 is ending ({state[0]}: cancelled, or past its time limit)")
    assert calls[4:] == [["scontrol", "show", "job", "-o", "42"]] * 2


def test_peer_failure_messages_and_fault_switch():
    d = D.Dist(0, 0, 2, torch.device("cpu"), "slurm", timeout_s=7)
    reset = RuntimeError("[/x/gloo/transport/tcp/pair.cc:545] Read error [1.2.3.4]:5: Connection reset by peer. "
                         "This is typically caused by a remote worker hanging")
    f = D.peer_failure(reset, d, 12)
    assert str(f) == ("distributed: rank 0 of 2 at iteration 12: lost the connection to rank 1 (it crashed or was "
                      "killed; see its log): Read error [1.2.3.4]:5: Connection reset by peer.")
    f = D.peer_failure(RuntimeError("Timed out waiting 7000ms for recv operation to complete"), d, 3)
    assert "waited more than dist.timeout_s=7 s for rank 1" in str(f)
    assert D.peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), d) is None  # a real bug
    assert D.peer_failure(reset, D.Dist(0, 0, 1, torch.device("cpu"), "single")) is None


def test_peer_failure_names_the_node_that_stopped_answering():
    reset = RuntimeError("Connection reset by peer")
    two = D.Dist(0, 0, 2, torch.device("cpu"), "slurm", timeout_s=7, hosts=("node1", "node2"))
    assert "lost the connection to rank 1 on node2 (it crashed" in str(D.peer_failure(reset, two, 5))
    three = D.Dist(1, 0, 3, torch.device("cpu"), "slurm", timeout_s=7, hosts=("node1", "node2", "node3"))
    assert "for one of the other 2 ranks on node1, node3 (it hangs" in str(
        D.peer_failure(RuntimeError("Timed out waiting 7000ms"), three, 5))
    local = D.Dist(0, 0, 2, torch.device("cpu"), "torchrun", timeout_s=7, hosts=("vm", "vm"))
    assert "lost the connection to rank 1 (it crashed" in str(D.peer_failure(reset, local, 5))  # one host: no node


def test_fault_injection_is_installed_only_when_asked(monkeypatch):
    batches = iter(range(5))
    assert D.inject_faults(batches, 0, 0, {}) is batches  # no variable: the epoch's iterator itself, no wrapper
    assert D.inject_faults(batches, 0, 0, {"LBSGD_FAULT_RANK": "1"}) is batches  # another rank's fault
    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(D.os, "_exit", fake_exit)
    seen = []
    wrapped = D.inject_faults(iter("abcde"), 1, 10, {"LBSGD_FAULT_RANK": "1", "LBSGD_FAULT_ITER": "12"})
    with pytest.raises(SystemExit):
        for b in wrapped:
            seen.append(b)
    assert seen == ["a", "b"] and exits == [70]  # iterations 10 and 11 ran; it crashed about to run 12
    wrapped = D.inject_faults(iter("ab"), 1, 10, {"LBSGD_FAULT_RANK": "1", "LBSGD_FAULT_ITER": "50"})
    assert list(wrapped) == ["a", "b"] and exits == [70]  # its iteration is not in this epoch


def test_sigterm_and_sigusr2_set_the_preemption_flag():
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        before = signal.getsignal(sig)
        flag = PreemptionFlag(["SIGTERM", "SIGUSR2"])
        assert not flag.agreed(torch.device("cpu"))
        os.kill(os.getpid(), sig)
        time.sleep(0.01)
        assert flag.agreed(torch.device("cpu")) and flag.raised == sig.name
        flag.restore()
        assert signal.getsignal(sig) == before
    flag = PreemptionFlag(["SIGUSR2"])
    flag.hold()  # leaving after a requeue: the handler stays, restore() leaves it
    flag.restore()
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0.01)
    assert flag.raised == "SIGUSR2"
    signal.signal(signal.SIGUSR2, before)


def test_dist_keys_are_checked_and_do_not_name_the_run(tmp_path):
    assert DistConfig().backend == "auto" and DistConfig().timeout_s > 0 and DistConfig().requeue is False
    for args, needle in ((["dist.backend=mpi"], "dist.backend"), (["dist.timeout_s=0"], "dist.timeout_s"),
                         (["dist.backend=nccl", "device=cpu"], "nccl needs CUDA")):
        proc = lbsgd("train", "threads=1", *args)
        assert proc.returncode == 2 and proc.stderr.startswith("lbsgd: error:") and needle in proc.stderr
    job = lbsgd("train", "--cfg", "hydra", "--resolve", "batch.k=8", "dist.requeue=true", "dist.timeout_s=30",
                  "batch.workers_per_pass=2")
    assert job.returncode == 0, job.stderr
    run_dir = OmegaConf.create(job.stdout).hydra.run.dir
    assert run_dir == "runs/train/batch.k=8"  # a requeued job finds it again: no timestamp, no launcher keys


def test_slurm_launcher_config_composes_and_renders_sbatch(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    submitit = pytest.importorskip("submitit")
    proc = lbsgd("train", "hydra/launcher=slurm", "hydra.launcher.nodes=2", "batch.k=16", "--cfg", "hydra",
                   "--resolve")
    assert proc.returncode == 0, proc.stderr
    launcher = OmegaConf.to_container(OmegaConf.create(proc.stdout).hydra.launcher)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == 8 and launcher["partition"] is None

    # the plugin's own translation of these keys (SlurmLauncher.launch), rendered without a cluster
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    params = {k: v for k, v in launcher.items() if k != "_target_"}
    executor = submitit.AutoExecutor(cluster="slurm", folder=str(tmp_path / "sub"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    text = executor._executor._make_submission_file_text("python -m lbsgd_cli train", "uid")
    lines = set(text.splitlines())
    for expected in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                     "#SBATCH --signal=USR2@120", "#SBATCH --time=4320", "#SBATCH --requeue",
                     "#SBATCH --cpus-per-task=10"):
        assert expected in lines, text
    assert not any(line.startswith("#SBATCH --partition") for line in lines)
    assert "srun" in text


def test_sbatch_script_is_valid_bash_and_forwards_overrides():
    script = ROOT / "scripts" / "slurm" / "slurm_train.sbatch"
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "#SBATCH --signal=USR2@120" in text and "#SBATCH --requeue" in text
    assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gpus-per-node=8" in text
    assert 'python -m lbsgd_cli train dist.requeue=true "$@"' in text and "srun " in text


def test_slurm_sweep_requeues_itself_and_a_cpu_partition_needs_tasks_per_node():
    """hydra/launcher=slurm adds dist.requeue=true (a preempted task must come back, or the sweep waits for it);
    gpus_per_node=0 leaves tasks_per_node at 0, which sbatch refuses with a traceback: one line instead."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from lbsgd_cli import cli

    sweep = ["-m", "batch.k=1,2", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0"]
    assert cli.slurm_sweep_args(sweep) == ["-m", "batch.k=1,2", "dist.requeue=true", *sweep[2:]]
    assert cli.slurm_sweep_args([*sweep, "dist.requeue=false"]) == [*sweep, "dist.requeue=false"]
    assert cli.slurm_sweep_args(["-m", "batch.k=1,2"]) == ["-m", "batch.k=1,2"]
    job = lbsgd("train", "batch.k=2", "hydra/launcher=slurm", "--cfg", "job")
    assert job.returncode == 0 and OmegaConf.create(job.stdout).dist.requeue is True
    proc = lbsgd("train", *sweep)
    assert proc.returncode == 2 and proc.stderr == (
        "lbsgd: error: hydra.launcher.tasks_per_node=0: SLURM needs at least 1 (gpus_per_node=0, a CPU partition: "
        "set hydra.launcher.tasks_per_node=N)\n")


def test_slurm_launcher_without_the_plugin_is_a_one_line_error(monkeypatch):
    from lbsgd_cli import cli
    from lbsgd_cli.errors import UserError

    monkeypatch.setattr(cli, "_has_module", lambda name: False)
    with pytest.raises(UserError, match=r"pip install 'lbsgd\[slurm\]'"):
        cli.preflight("train", ["-m", "hydra/launcher=slurm", "batch.k=4,8"])


@pytest.mark.slow
def test_w2_equals_w1_in_bf16(tmp_path):
    """precision=bf16 keeps the W-invariance: 2 gloo processes (torchrun) end with the weights of one process
    making the same passes, bit for bit, and with the same val errors (issue 13 item 1)."""
    args = [*CFG, "precision=bf16"]
    ref, run = tmp_path / "ref", tmp_path / "w2"
    ref_proc = train(ref, args)
    assert ref_proc.returncode == 0, ref_proc.stderr
    w2 = train(run, args, processes=2)
    assert w2.returncode == 0, w2.stderr
    w_ref, w_run = run_weights(ref), run_weights(run)
    assert all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)
    epochs = [[json.loads(x)["val/err"] for x in (d / "metrics.jsonl").read_text().splitlines() if "val/err" in x]
              for d in (ref, run)]
    assert epochs[0] == epochs[1] and len(epochs[0]) == 3


def test_preemption_is_agreed_every_n_iterations_and_at_checkpoints(tmp_path):
    """With a process group the host flag is allreduced only every checkpoint.preempt_check_every iterations
    (or when a scheduled checkpoint forces it); without one it is read at every iteration."""
    assert not D.dist.is_initialized()
    flag = PreemptionFlag([], check_every=10)
    flag.raised = "SIGUSR2"
    assert flag.agreed(torch.device("cpu"), iteration=3)  # one process: every iteration
    D.dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert not flag.agreed(torch.device("cpu"), iteration=3)
        assert flag.agreed(torch.device("cpu"), iteration=3, force=True)
        assert flag.agreed(torch.device("cpu"), iteration=20)
    finally:
        D.dist.destroy_process_group()


@pytest.mark.slow
def test_divergence_on_two_processes_stops_both_at_one_iteration(tmp_path):
    """Both ranks stop with exit 5 and the same line; the checkpoint is the one from before."""
    run = tmp_path / "run"
    args = [f"hydra.run.dir={run}", "experiment=debug", "optim.base_lr=1e8", "schedule.warmup=none",
            "checkpoint.every_iters=2", "log.progress=none", "log.tensorboard=false"]
    procs = srun_like(args, tmp_path)
    codes = [p.wait(timeout=120) for p in procs]
    errs = [(tmp_path / f"rank{r}.err").read_text().strip() for r in (0, 1)]
    assert codes == [5, 5], errs
    assert errs[0] == errs[1] and errs[0].startswith("lbsgd: diverged: non-finite") and "\n" not in errs[0]
    summary = json.loads((run / "summary.json").read_text())
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert summary["diverged"] and ckpt["iteration"] <= summary["diverged_at_iteration"]
