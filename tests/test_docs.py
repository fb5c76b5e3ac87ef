"""docs/install.md: the CPU-only install takes torch and torchvision from PyTorch's CPU index before the project,
and its table of extras is pyproject.toml's."""

from __future__ import annotations

import re

import tomllib

from .conftest import ROOT

INSTALL = ROOT / "docs" / "install.md"
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def _commands(text: str) -> list[str]:
    return [line.strip() for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
            for line in block.splitlines() if line.strip()]


def test_the_cpu_only_install_takes_torch_from_the_cpu_index_before_the_project():
    lines = _commands(INSTALL.read_text())
    cpu = next(i for i, line in enumerate(lines) if CPU_INDEX in line)
    assert re.fullmatch(rf"pip install torch torchvision {re.escape(CPU_INDEX)}", lines[cpu])
    assert lines[cpu + 1] == "pip install -e '.[test]'"


def test_the_table_of_extras_is_pyprojects():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    rows = re.findall(r"^\| `([a-z0-9]+)` \|", INSTALL.read_text(), flags=re.MULTILINE)
    assert sorted(rows) == sorted(extras)
