"""lbsgd_cli.report.runs: run directories read from their files alone, summary.csv one row per run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from lbsgd_cli.cli import main
from lbsgd_cli.report.runs import FIELDS


def test_cli_writes_summary_with_steps_and_diverged(study_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["plot", str(study_dir), "--out", str(out), "--no-figures"]) == 0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert list(rows[0]) == FIELDS and len(rows) == 9
    none = next(r for r in rows if r["run"] == "large-none")
    assert none["diverged"] == "True" and none["val_err"] == "" and none["steps"] == "7"
    assert next(r for r in rows if r["run"] == "base-s0")["steps"] == "30"


def test_no_runs_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lbsgd: error: no run") and err.count("\n") == 1
    assert main(["plot", str(tmp_path / "missing")]) == 2
