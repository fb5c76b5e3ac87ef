"""The experiment scripts of ``scripts/``: every run they start is a valid config in a directory of its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lbsgd_cli.config import validate

from .conftest import ROOT, compose


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_exp_cifar_starts_valid_runs_each_in_its_own_directory(tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    fake = tmp_path / "lbsgd"  # records the command line instead of training
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)
    env = {**os.environ, "DATA": str(tmp_path), "SCALE": "cpu", "RUNS": str(tmp_path / "runs"), "LBSGD": str(fake)}
    parts = ["ladder", "table1", "seeds", "rules", "nozg", "fp32", "probe"]
    subprocess.run(["bash", str(ROOT / "scripts" / "exp_cifar.sh"), *parts], env=env, check=True,
                   capture_output=True)
    runs = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(runs) == 7 + 4 + 7 + 6 + 14 + 2 + 7
    dirs = [next(a for a in r if a.startswith("hydra.run.dir=")) for r in runs]
    assert len(set(dirs)) == len(dirs), "two runs of the script share a run directory"
    assert all(r[0] == "train" for r in runs)
    for overrides in {tuple(a for a in r[1:] if not a.startswith("hydra.")) for r in runs}:
        validate(compose("train", overrides))  # every key the script sets exists and every value is valid


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
        out = subprocess.run(["bash", str(ROOT / "scripts" / "exp_cifar.sh"), "nozg"], env=env, check=True,
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
def test_exp_beyond_starts_valid_runs_each_in_its_own_directory(tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    fake = tmp_path / "lbsgd"  # records the command line instead of training
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)
    env = {**os.environ, "DATA": str(tmp_path), "RUNS": str(tmp_path / "runs"), "LBSGD": str(fake)}
    subprocess.run(["bash", str(ROOT / "scripts" / "exp_beyond.sh"), "noise", "lars-probe", "lars", "warmup"],
                   env=env, check=True, capture_output=True)
    runs = [json.loads(line) for line in calls.read_text().splitlines()]
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
