"""The wheel: every package of lbsgd_cli's source tree is listed in pyproject.toml, so an install has it."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_under_lbsgd_cli_is_in_the_wheel():
    """``[tool.setuptools] packages`` names each folder of lbsgd_cli with an ``__init__.py`` (lbsgd_cli.data
    too), as setuptools' find_packages would find them; lbsgd_cli.conf comes from conf/ (package-dir)."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lbsgd_cli").rglob("__init__.py")
             if "__pycache__" not in p.parts}
    assert {"lbsgd_cli", "lbsgd_cli.data"} <= found
    assert found <= listed, f"not in pyproject.toml's packages: {sorted(found - listed)}"
    assert listed - found == {"lbsgd_cli.conf"} and tool["package-dir"]["lbsgd_cli.conf"] == "conf"
