"""Shared by the SLURM tiers (tests/test_slurm.py: one node; tests/test_multinode.py: nodes in network namespaces):
a cluster started by one of scripts/slurm/slurm_*.sh, its jobs, and what a run directory holds at the end."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from .conftest import ROOT

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def missing() -> str | None:
    for exe in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol"):
        if shutil.which(exe) is None and not Path("/usr/sbin", exe).exists():
            return f"no SLURM here ({exe} not found; apt-get install slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd starts jobs as their user)"
    return None


@dataclass
class Cluster:
    dir: Path
    env: dict[str, str]

    def run(self, *cmd: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, cwd=cwd, capture_output=True, text=True, check=check,
                              timeout=60)

    def sbatch(self, *args: str, cwd: Path) -> str:
        return self.run("sbatch", "--parsable", *args, cwd=cwd).stdout.strip().split(";")[0]

    def job(self, job: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job: str, timeout: float = 240) -> dict[str, str]:
        """The job's record once it has ended (a requeued job ends only after its last start)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job)
            if info.get("JobState") in FINAL:
                return info
            time.sleep(0.5)
        self.run("scancel", job, check=False)
        raise AssertionError(f"job {job} still {self.job(job).get('JobState')} after {timeout} s")




def start_cluster(script: str, *up_args: str) -> Iterator[Cluster]:
    """``scripts/slurm/<script> up DIR ...`` for a test session, and ``down DIR`` after it, even when a test fails;
    skip without SLURM (or root), fail instead when LBSGD_SLURM_REQUIRED=1."""
    why = missing()
    if why:
        if os.environ.get("LBSGD_SLURM_REQUIRED") == "1":
            pytest.fail(f"LBSGD_SLURM_REQUIRED=1 but {why}")
        pytest.skip(why)
    top = Path(tempfile.mkdtemp(prefix="lbsgd-slurm-"))
    up = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / script), "up", str(top), *up_args], capture_output=True,
                        text=True, timeout=120)
    if up.returncode != 0:
        shutil.rmtree(top, ignore_errors=True)
        pytest.fail(f"the local cluster did not start: {up.stderr.strip()}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HYDRA_FULL_ERROR")}
    env.update(SLURM_CONF=str(top / "slurm.conf"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # jobs run this python (sbatch --export=ALL)
    try:
        yield Cluster(top, env)
    finally:
        subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / script), "down", str(top)], timeout=120)
        shutil.rmtree(top, ignore_errors=True)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]


def val_errs(run: Path) -> list[float]:
    return [json.loads(x)["val/err"] for x in (run / "metrics.jsonl").read_text().splitlines() if "val/err" in x]


def wait_for_checkpoint(run_glob: tuple[Path, str], at_least: int, timeout: float = 180) -> Path:
    base, pattern = run_glob
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ckpt in base.glob(pattern):
            try:
                if torch.load(ckpt, weights_only=False)["iteration"] >= at_least:
                    return ckpt
            except Exception:  # being written
                pass
        time.sleep(0.3)
    raise AssertionError(f"no checkpoint {pattern} at iteration >= {at_least} in {timeout} s")


def pid_of_rank(job: str, rank: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                env = dict(x.split("=", 1) for x in (proc / "environ").read_text().split("\0") if "=" in x)
                cmd = (proc / "cmdline").read_text()
            except OSError:
                continue
            if env.get("SLURM_JOB_ID") == job and env.get("SLURM_PROCID") == str(rank) and "lbsgd_cli" in cmd:
                return int(proc.name)
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} of job {job}")
