"""One schema: Enums for the choice keys, no-effect keys derived from field metadata, finite floats,
YAML that holds only differences, and every experiment preset composing and validating."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from lbsgd_cli import config, validation
from lbsgd_cli.config import TrainConfig, no_effect_keys
from lbsgd_cli.errors import UserError
from lbsgd_cli.rundir import config_difference
from lbsgd_cli.validation import validate

from .conftest import ROOT, compose

PRESETS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
SCALES = sorted(p.stem for p in (ROOT / "conf" / "scale").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_composes_and_validates(preset, tmp_path):
    root = [] if compose("train", [f"experiment={preset}"]).data.name == "digits" else [f"data.root={tmp_path}"]
    cfg = compose("train", [f"experiment={preset}", *root])
    validate(cfg)
    assert OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    source = {"cifar100": "cifar100", "cifar": "cifar10", "imagenet": "imagefolder"}
    expected = next((name for prefix, name in source.items() if preset.startswith(prefix)), None)
    if expected:
        assert cfg.data.name == expected
    if preset.startswith("cifar"):  # either source: torchvision's batches or a 32x32 ImageFolder tree
        validate(compose("train", [f"experiment={preset}", "data=imagefolder", f"data.root={tmp_path}"]))
    for scale in SCALES:
        validate(compose("train", [f"experiment={preset}", *root, f"scale={scale}"]))


def test_cpu_scales_keep_the_papers_fractions_of_training():
    """scale=cpu_90 is the paper's schedule (section 5.1: /10 at 30, 60, 80 of 90 epochs); scale=cpu is it halved."""
    for scale, epochs, milestones in (("cpu_90", 90, [30, 60, 80]), ("cpu", 45, [15, 30, 40])):
        cfg = compose("train", ["experiment=cifar_large_gradual", "data.root=/x", f"scale={scale}"])
        assert (cfg.schedule.epochs, list(cfg.schedule.milestones), cfg.model.depth) == (epochs, milestones, 8)
        assert (cfg.schedule.warmup_epochs, cfg.optim.ref_batch, cfg.precision) == (5, 128, "bf16")


@pytest.mark.parametrize("preset, kn, warmup", [("cifar100_gradual", 2048, "gradual"), ("cifar100_none", 2048, "none"),
                                                ("cifar100_baseline", 128, "none")])
def test_cifar100_presets_are_the_warmup_replications(preset, kn, warmup):
    """/work/shared/paper.md: ResNet-18 on CIFAR-100, 150 epochs, lr = 0.1 * B / 256, 5-epoch warmup or none."""
    cfg = compose("train", [f"experiment={preset}", "data.root=/x"])
    validate(cfg)
    assert (cfg.data.name, cfg.data.labels, cfg.model.arch, cfg.model.stem) == ("cifar100", "fine", "resnet18", "cifar")
    assert (cfg.batch.k * cfg.batch.n, cfg.batch.n, cfg.schedule.warmup, cfg.schedule.epochs) == (kn, 32, warmup, 150)
    assert cfg.optim.base_lr * kn / cfg.optim.ref_batch == pytest.approx(0.1 * kn / 256)
    assert cfg.schedule.warmup_epochs == 5 and list(cfg.schedule.milestones) == [75, 112]
    for k in (32, 128):  # the ladder's other rungs: kn 1024 and 4096
        validate(compose("train", [f"experiment={preset}", "data.root=/x", f"batch.k={k}"]))


def test_cifar100_warmup_ladder_sweeps_kn_1024_2048_4096_with_and_without_warmup():
    cfg = compose("train", ["experiment=cifar100_warmup", "data.root=/x"], return_hydra=True)
    params = cfg.hydra.sweeper.params
    assert [32 * int(k) for k in params["batch.k"].split(",")] == [1024, 2048, 4096]
    assert params["schedule.warmup"].split(",") == ["gradual", "none"]
    for k in params["batch.k"].split(","):
        for w in params["schedule.warmup"].split(","):
            one = compose("train", ["experiment=cifar100_warmup", "data.root=/x", f"batch.k={k}", f"schedule.warmup={w}"])
            validate(one)
            assert one.model.stem == "cifar" and one.optim.base_lr * one.batch.k * 32 / one.optim.ref_batch == \
                pytest.approx(0.1 * int(k) * 32 / 256)


@pytest.mark.parametrize("overrides, message", [
    (["data=cifar10", "data.labels=coarse"], "data.labels: coarse labels are CIFAR-100's"),
    (["data=cifar100", "data.in_memory='false'"], "data.in_memory: data=cifar100 is read into memory"),
    (["data=imagefolder", "data.download=true"], "data.download: fetches CIFAR-10/100"),
    (["model=cifar_resnet", "model.stem=cifar"], "model.stem: cifar replaces a torchvision ResNet"),
    (["model=resnet50", "model.shortcut=B"], "model.shortcut: chooses a CIFAR ResNet's shortcut"),
])
def test_cifar_keys_are_checked_early(overrides, message):
    with pytest.raises(UserError, match=f"^{message}") as e:
        validate(compose("train", [*overrides, *(["data.root=/x"] if overrides[0].startswith("data=") else [])]))
    assert "\n" not in str(e.value)


def test_cifar_without_a_root_says_where_to_point_it():
    with pytest.raises(UserError, match="data.root: is required with data=cifar10 .*cifar-10-batches-py/"):
        validate(compose("train", ["experiment=cifar_large_gradual"]))


def test_paper_presets_have_the_papers_numbers():
    cfg = compose("train", ["experiment=imagenet_8k_gradual", "data.root=/x"])
    assert (cfg.batch.k * cfg.batch.n, cfg.model.arch, cfg.schedule.epochs, list(cfg.schedule.milestones)) == (
        8192, "resnet50", 90, [30, 60, 80])
    assert cfg.optim.base_lr * cfg.batch.k * cfg.batch.n / cfg.optim.ref_batch == pytest.approx(3.2)


def test_no_effect_keys_come_from_the_schema_and_reach_hydra():
    keys = no_effect_keys("train")
    assert {"batch.eval_batch", "batch.workers_per_pass", "offload.mode", "memory.fsdp", "log.every", "device",
            "threads", "data.root", "dist.backend", "dist.timeout_s", "checkpoint.every_iters"} <= set(keys)
    assert not {"batch.k", "batch.n", "optim.base_lr", "precision", "seed", "dist.comm_hook", "data.val_subset",
                "deterministic", "data.in_memory"} & set(keys)
    assert no_effect_keys("eval") == ["eval.batch", "data.cache_dir", "data.num_workers", "device", "threads"]
    for command in ("train", "eval"):
        hydra = compose(command, ["checkpoint=x"] if command == "eval" else [], return_hydra=True).hydra
        assert list(hydra.job.config.override_dirname.exclude_keys) == no_effect_keys(command)


def test_resume_check_ignores_exactly_the_no_effect_keys():
    base = OmegaConf.to_container(OmegaConf.structured(TrainConfig), enum_to_str=True)

    def changed(key: str, value) -> dict:
        new = OmegaConf.create(base)
        OmegaConf.update(new, key, value)
        return OmegaConf.to_container(new)

    assert config_difference(base, changed("batch.eval_batch", 64)) is None  # named the run before: a bug
    assert config_difference(base, changed("offload.mode", "model")) is None
    assert config_difference(base, changed("memory.fsdp", True)) is None
    assert config_difference(base, changed("precision", "bf16")) == "precision: 'auto' -> 'bf16'"
    assert config_difference(base, changed("compile_mode", "reduce_overhead")) == \
        "compile_mode: 'default' -> 'reduce_overhead'"
    before_compile_mode = {k: v for k, v in base.items() if k != "compile_mode"}  # a run started before the key
    assert config_difference(before_compile_mode, base) is None
    assert config_difference(base, changed("optim.base_lr", 0.2)) == "optim.base_lr: 0.1 -> 0.2"


def _float_keys() -> list[str]:
    return [key for key, kind, _ in config.leaves(TrainConfig) if config.is_float_type(kind)]


def test_every_float_key_rejects_nan_and_inf():
    keys = _float_keys()
    assert {"optim.base_lr", "schedule.gamma", "schedule.warmup_epochs", "model.bn_momentum", "data.mean",
            "dist.timeout_s", "optim.lars_eta"} <= set(keys)
    good = compose("train")
    validate(good)
    for key in keys:
        for bad in (math.nan, math.inf, -math.inf):
            cfg = good.copy()
            OmegaConf.update(cfg, key, [bad, 0.5, 0.5] if key in ("data.mean", "data.std") else bad)
            with pytest.raises(UserError, match=f"^{key}: must be a finite number") as e:
                validate(cfg)
            assert "\n" not in str(e.value)


def _schema_default(schema_cfg, group: str, key_path: str):
    return OmegaConf.select(schema_cfg, f"{group}.{key_path}" if group else key_path, default="<absent>")


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").glob("*/*.yaml")
                                        if p.parent.name in ("data", "model", "optim", "schedule", "scale")))
def test_group_yaml_holds_only_what_differs_from_the_schema(path):
    text = (ROOT / "conf" / path).read_text()
    values = yaml.safe_load(text) or {}
    group = "" if "@package _global_" in text else Path(path).parent.name
    schema = OmegaConf.structured(TrainConfig)
    # a scale file overrides the CIFAR presets (schedule=cifar, ...), not the schema
    below = compose("train", ["experiment=cifar_large_gradual", "data.root=/x"]) if path.startswith("scale/") \
        else schema
    for key, value in _leaves({k: v for k, v in values.items() if k != "defaults"}):
        if value == "???":
            continue
        assert _schema_default(below, group, key) != value, f"{path}: {key} repeats what it overrides"


def test_rules_and_optim_do_not_depend_on_the_config_layer():
    for module in ("rules", "optim", "choices"):
        tree = ast.parse((ROOT / "lbsgd_cli" / f"{module}.py").read_text())
        imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {"config", "hydra", "omegaconf"} & {m.split(".")[0] for m in imported}, (module, imported)


def test_validation_reads_the_config_and_normalising_is_a_step_of_its_own():
    """validate() changes nothing, even where a key takes several spellings; normalise_train and
    normalise_quantize give each value one spelling (what train and quantize write into their outputs)."""
    cfg = compose("train", ["data=imagefolder", "data.root=/x", "data.in_memory=False"])
    before = OmegaConf.to_container(cfg)
    validate(cfg)
    assert OmegaConf.to_container(cfg) == before and cfg.data.in_memory is False
    config.normalise_train(cfg)
    assert cfg.data.in_memory == "false"
    q = compose("quantize", ["checkpoint=x", "quant.symmetric=[yes,off]", "quant.activations=on"])
    before = OmegaConf.to_container(q)
    validation.validate_quantize(q)
    assert OmegaConf.to_container(q) == before
    config.normalise_quantize(q)
    assert list(q.quant.symmetric) == [True, False] and q.quant.activations is True
