"""The README's command lines are tests: every ``lbsgd ...`` line of its code blocks composes and validates
(data roots swapped for a small temporary tree, nothing trained), and every bool, int and list key takes
the spellings Hydra users type."""

from __future__ import annotations

import re
import shlex
import typing

import pytest
from omegaconf import OmegaConf

from lbsgd_cli import cli, config
from lbsgd_cli.config import TrainConfig, validate

from .conftest import ROOT, compose, lbsgd, make_image_tree

# how a code line starts lbsgd: the command itself, python -m / torchrun -m lbsgd_cli, $(which lbsgd), the sbatch
# script (it runs `lbsgd train` with its arguments)
LAUNCHERS = {"lbsgd": None, "lbsgd)": None, "lbsgd_cli": None, "scripts/slurm_train.sbatch": "train"}


def readme_commands() -> list[list[str]]:
    """``[command, args...]`` of every line of README.md's code blocks that runs lbsgd."""
    text = (ROOT / "README.md").read_text()
    found = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            for i, token in enumerate(tokens):
                if token in LAUNCHERS:
                    rest = tokens[i + 1:]
                    found.append([LAUNCHERS[token], *rest] if LAUNCHERS[token] else rest)
                    break
    return found


COMMANDS = readme_commands()
DATA_KEYS = re.compile(r"^(data\.root|data_root)=")


def test_the_readme_has_command_lines():
    assert len(COMMANDS) >= 20 and {c[0] for c in COMMANDS} >= {"train", "eval", "quantize", "plot"}


def _reads_a_root(args: list[str]) -> bool:
    """Whether the data set the line's ``data=`` / ``experiment=`` (first value of a sweep) picks reads data.root
    (the default, the embedded digits, refuses one)."""
    picks = [a.split(",")[0] for a in args if a.startswith(("data=", "experiment="))]
    return compose("train", picks).data.name != "digits"


@pytest.mark.parametrize("line", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_readme_command_line_composes_and_validates(line, tmp_path):
    root = make_image_tree(tmp_path / "data", per_class=2, val_per_class=1)
    command, args = line[0], [re.sub(r"<[^>]+>", "x", a) for a in line[1:] if a != "..."]  # <time>: a value
    if "..." in line and command == "train" and not any(DATA_KEYS.match(a) for a in args) and _reads_a_root(args):
        args.append("data.root=...")  # `...` stands for the rest of the command, such as the data set
    args = [f"{a.split('=', 1)[0]}={root}" if DATA_KEYS.match(a) else a for a in args]
    if command == "plot":  # not a Hydra app: its arguments parse, and an empty folder is lbsgd's own one line
        args = [str(tmp_path / "empty") if not a.startswith("-") and i == 0 else a for i, a in enumerate(args)]
        (tmp_path / "empty").mkdir()
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


# --------------------------------------------------------------------------- spellings


def _leaves_of(kind) -> list[str]:
    return [key for key, k, _ in config._leaves(TrainConfig) if k is kind or typing.get_origin(k) is kind]


BOOL_KEYS = _leaves_of(bool)
INT_KEYS = _leaves_of(int)
LIST_KEYS = [key for key, k, _ in config._leaves(TrainConfig) if typing.get_origin(k) is list]


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
    validate(cfg)
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
        config.validate_quantize(cfg)
        assert config.as_list(OmegaConf.select(cfg, key)) == value
