"""The documentation's command lines are tests: every ``lbsgd ...`` line of the code blocks of README.md and
docs/*.md (and a command table's first column) composes and validates (data roots swapped for a small temporary
tree, nothing trained), a ``lbsgd plot`` line that rebuilds results/ names run directories a fresh clone has, every
relative link points to a file and heading that exist, the front page opens with the result, the module map
names every module, and every bool, int and list key takes the spellings Hydra users type."""

from __future__ import annotations

import re
import shlex
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import lbsgd_cli
from lbsgd_cli import cli, config, validation
from lbsgd_cli.config import TrainConfig, normalise_train
from lbsgd_cli.validation import validate

from .conftest import ROOT, compose, lbsgd, make_image_tree

# how a code line starts lbsgd: the command itself, python -m / torchrun -m lbsgd_cli, $(which lbsgd), the sbatch
# script (it runs `lbsgd train` with its arguments)
LAUNCHERS = {"lbsgd": None, "lbsgd)": None, "lbsgd_cli": None, "scripts/slurm/slurm_train.sbatch": "train"}
# the pages whose command lines are tests: the front page and the reference
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a table row whose first cell is one `lbsgd ...` command (the front page's table of commands)
TABLE_COMMAND = re.compile(r"^\|\s*`(lbsgd [^`]+)`\s*\|", flags=re.M)


def command_lines(page: Path) -> list[list[str]]:
    """``[command, args...]`` of every line of the page's code blocks that runs lbsgd, and of every table row
    whose first cell is a ``lbsgd ...`` command."""
    text = page.read_text()
    lines = [line for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)
             for line in block.replace("\\\n", " ").splitlines()]
    found = []
    for line in [*lines, *TABLE_COMMAND.findall(text)]:
        tokens = shlex.split(line, comments=True)
        for i, token in enumerate(tokens):
            if token in LAUNCHERS:
                rest = tokens[i + 1:]
                found.append([LAUNCHERS[token], *rest] if LAUNCHERS[token] else rest)
                break
    return found


def doc_commands() -> list[tuple[str, list[str]]]:
    """``(page, [command, args...])`` of every page's command lines, each line once (the first page naming it)."""
    seen, found = set(), []
    for page in PAGES:
        for line in command_lines(page):
            if tuple(line) not in seen:
                seen.add(tuple(line))
                found.append((str(page.relative_to(ROOT)), line))
    return found


COMMANDS = doc_commands()
DATA_KEYS = re.compile(r"^(data\.root|data_root)=")


def test_the_readme_and_docs_have_command_lines_of_every_command():
    assert len(COMMANDS) >= 30 and {c[0] for _, c in COMMANDS} >= {"train", "eval", "quantize", "plot"}
    assert {c[0] for c in command_lines(ROOT / "README.md")} >= {"train", "eval", "quantize", "plot"}
    assert {page for page, _ in COMMANDS} >= {"README.md", "docs/config.md", "docs/distributed.md", "docs/eval.md"}


def _reads_a_root(args: list[str]) -> bool:
    """Whether the data set the line's ``data=`` / ``experiment=`` (first value of a sweep) picks reads data.root
    (the default, the embedded digits, refuses one)."""
    picks = [a.split(",")[0] for a in args if a.startswith(("data=", "experiment="))]
    return compose("train", picks).data.name != "digits"


def plot_inputs(args: list[str]) -> list[str]:
    """The run directories of a ``lbsgd plot`` line: its arguments that are neither options nor their values."""
    return [a for prev, a in zip(["", *args], args) if not a.startswith("-") and prev != "--out"]


@pytest.mark.parametrize("page,line", COMMANDS, ids=[f"{page}: {' '.join(c)}" for page, c in COMMANDS])
def test_every_lbsgd_line_of_the_readme_and_docs_composes_and_validates(page, line, tmp_path):
    root = make_image_tree(tmp_path / "data", per_class=2, val_per_class=1)
    command, args = line[0], [re.sub(r"<[^>]+>", "x", a) for a in line[1:] if a != "..."]  # <time>: a value
    if "..." in line and command == "train" and not any(DATA_KEYS.match(a) for a in args) and _reads_a_root(args):
        args.append("data.root=...")  # `...` stands for the rest of the command, such as the data set
    args = [f"{a.split('=', 1)[0]}={root}" if DATA_KEYS.match(a) else a for a in args]
    if command == "plot":  # not a Hydra app: its arguments parse, and an empty folder is lbsgd's own one line
        inputs = plot_inputs(args)
        out = args[args.index("--out") + 1] if "--out" in args else ""
        if out.rstrip("/") == "results" or out.startswith("results/"):  # it rebuilds the committed results/
            missing = [a for a in inputs if not (ROOT / a).is_dir()]
            assert not missing, f"{page}: {missing} are not in a fresh clone (the committed runs: results/runs/)"
        (tmp_path / "empty").mkdir()
        args = [str(tmp_path / "empty") if a in inputs else a for a in args]
        args = [str(tmp_path / "out") if prev == "--out" else a for prev, a in zip(["", *args], args)]
        result = lbsgd("plot", *args, "--no-figures")
        assert "usage:" not in result.stderr and result.stderr.count("\n") <= 1, result.stderr
        return
    assert command in cli.COMMANDS
    if any(a.startswith("-") and a != "-m" for a in args):  # --cfg job, --help: they print, so run them
        result = lbsgd(command, *args)
        assert result.returncode == 0 and result.stdout, result.stderr
        return
    cli._register()
    cli.preflight(command, cli.quote_paths(args))  # what `lbsgd` does before Hydra starts: compose, validate
    if command == "train" and "-m" not in args:  # the composed data root is the temporary tree
        cfg = compose("train", [a for a in args if not a.startswith("hydra")])
        assert cfg.data.root in (None, str(root))


def test_a_plot_line_that_rebuilds_results_must_name_committed_run_directories():
    args = ["runs/results/cifar", "results/runs/cifar90", "--out", "results"]
    assert plot_inputs(args) == ["runs/results/cifar", "results/runs/cifar90"]
    assert [a for a in plot_inputs(args) if not (ROOT / a).is_dir()] == ["runs/results/cifar"]


# --------------------------------------------------------------------------- the pages themselves


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation but - and _ dropped, spaces as -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_github_anchors_are_the_headings_in_lower_case_without_punctuation():
    assert github_anchor("Guarantee, as it is") == "guarantee-as-it-is"
    assert github_anchor("Fast on a GPU: the `auto` defaults") == "fast-on-a-gpu-the-auto-defaults"
    assert github_anchor("Memory: offloading, activation checkpointing, FSDP2") == \
        "memory-offloading-activation-checkpointing-fsdp2"


@pytest.mark.parametrize("page", [*PAGES, ROOT / "results" / "README.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_of_the_readme_and_docs_points_to_a_file_and_heading_that_exist(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def claims_table(page: Path) -> list[str]:
    lines = page.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| claim |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_the_front_page_shows_figure_1_and_the_claims_table_before_the_set_up_in_at_most_250_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    set_up = next(i for i, line in enumerate(lines) if line.startswith("## Set up"))
    figure = next(i for i, line in enumerate(lines) if line.startswith("![") and "fig1_" in line)
    table = next(i for i, line in enumerate(lines) if line.startswith("| claim |"))
    assert len(lines) <= 250 and figure < set_up and table < set_up
    assert len(claims_table(ROOT / "README.md")) >= 8
    assert (ROOT / re.search(r"\((results/[^)]+\.png)\)", lines[figure]).group(1)).is_file()


def test_results_readme_opens_with_the_front_page_s_claims_table():
    text = (ROOT / "results" / "README.md").read_text()
    assert claims_table(ROOT / "results" / "README.md") == claims_table(ROOT / "README.md")
    assert text.index("| claim |") < text.index("\n## ")


def test_the_module_map_names_every_module_of_the_package_and_no_other():
    """The map in lbsgd_cli/__init__.py names each top-level module and package; a package's own docstring
    maps its modules the same way (report/, data/)."""
    import importlib

    package = ROOT / "lbsgd_cli"
    top = {p.stem for p in package.glob("*.py") if p.stem not in ("__init__", "__main__")}
    packages = {p.parent.name for p in package.glob("*/__init__.py") if p.parent.name != "conf"}
    mapped = set(re.findall(r"^  (\S+)\s", lbsgd_cli.__doc__, flags=re.M))
    assert sorted((top | packages) - mapped) == [] and sorted(mapped - top - packages) == []
    for name in sorted(packages):
        inner = {p.stem for p in (package / name).glob("*.py") if p.stem != "__init__"}
        doc = importlib.import_module(f"lbsgd_cli.{name}").__doc__ or ""
        listed = set(re.findall(r"^  (\S+)\s", doc, flags=re.M))
        assert (name, sorted(inner - listed), sorted(listed - inner)) == (name, [], [])


# --------------------------------------------------------------------------- spellings


def _leaves_of(kind) -> list[str]:
    return [key for key, k, _ in config.leaves(TrainConfig) if k is kind or typing.get_origin(k) is kind]


BOOL_KEYS = _leaves_of(bool)
INT_KEYS = _leaves_of(int)
LIST_KEYS = [key for key, k, _ in config.leaves(TrainConfig) if typing.get_origin(k) is list]


@pytest.mark.parametrize("spelling,value", [("true", True), ("false", False), ("True", True), ("False", False),
                                            ("yes", True), ("no", False), ("on", True), ("off", False)])
def test_every_bool_key_takes_the_spellings_hydra_users_type(spelling, value):
    assert len(BOOL_KEYS) >= 15
    overrides = [f"{key}={spelling}" for key in BOOL_KEYS]
    cfg = compose("train", overrides)
    assert all(OmegaConf.select(cfg, key) is value for key in BOOL_KEYS)


@pytest.mark.parametrize("spelling", ["true", "false", "auto", "True", "False", "'false'", "'true'", "AUTO"])
def test_data_in_memory_takes_true_false_and_auto(spelling, tmp_path):
    cfg = compose("train", ["data=imagefolder", f"data.root={tmp_path}", f"data.in_memory={spelling}"])
    before = OmegaConf.to_container(cfg)
    validate(cfg)
    assert OmegaConf.to_container(cfg) == before  # validation checks; it changes nothing
    normalise_train(cfg)
    assert cfg.data.in_memory == spelling.strip("'").lower()  # one spelling in config.yaml and checkpoints
    result = lbsgd("train", "data=imagefolder", f"data.root={tmp_path}", f"data.in_memory={spelling}", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    with pytest.raises(Exception, match="data.in_memory: must be auto, true or false, got 'maybe'"):
        validate(compose("train", ["data.in_memory=maybe"]))


def test_int_and_list_keys_take_hydra_s_spellings():
    ints = {key: 3 for key in INT_KEYS}
    cfg = compose("train", [f"{key}=3" for key in ints])
    assert all(OmegaConf.select(cfg, key) == 3 for key in ints)
    assert len(LIST_KEYS) >= 2
    cfg = compose("train", ["schedule.milestones=[30,60]", "checkpoint.preempt_signals=[SIGTERM]",
                            "data.mean=[0.5,0.5,0.5]", "data.std=[0.25, 0.25, 0.25]"])
    assert list(cfg.schedule.milestones) == [30, 60] and list(cfg.checkpoint.preempt_signals) == ["SIGTERM"]
    assert list(cfg.data.std) == [0.25] * 3
    cfg = compose("train", ["schedule.milestones=[]"])
    assert list(cfg.schedule.milestones) == []


@pytest.mark.parametrize("spelling,value", [("yes", [True]), ("False", [False]), ("[true,no]", [True, False])])
def test_quantize_s_bool_or_list_keys_take_the_same_spellings(spelling, value):
    for key in ("quant.symmetric", "quant.activations"):
        cfg = compose("quantize", ["checkpoint=x", f"{key}={spelling}"])
        validation.validate_quantize(cfg)
        config.normalise_quantize(cfg)
        assert config.as_list(OmegaConf.select(cfg, key)) == value
