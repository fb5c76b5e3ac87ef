"""Shared fixtures: tiny JPEG trees made on the fly, a runner for the ``lbsgd`` CLI, free ports and a clean
environment for multi-process runs, a run's weights, and a tiny network with a batch for the step tests."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def make_image_tree(root: Path, classes=("a", "b", "c"), per_class: int = 8, val_per_class: int = 4,
                    size: int = 16, seed: int = 0) -> Path:
    """A real ImageFolder tree of JPEGs whose class is visible in the pixels (a coloured blob)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for ci, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = torch.randint(0, 60, (size, size, 3), generator=g, dtype=torch.uint8)
                img[:, :, ci % 3] += 150
                Image.fromarray(img.numpy()).save(d / f"{i:04d}.jpg", quality=90)
    return root


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    return make_image_tree(tmp_path / "data")


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    """``python -m lbsgd_cli <args>`` in a subprocess with one thread and plain progress output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "lbsgd_cli", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"lbsgd {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# Short digits runs used by several tests: a warmup, a rate drop, a few epochs.
SHORT = ["experiment=debug"]  # conf/experiment/debug.yaml: 3 epochs of digits, a warmup epoch, a rate drop


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def lbsgd(*args: str) -> Result:
    """``lbsgd <args>`` in this process (the fast tier): ``cli.main`` with stdout and stderr captured and
    its exit status, whether returned or raised as SystemExit."""
    from lbsgd_cli import cli

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv[:]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.argv = argv
    return Result(code, out.getvalue(), err.getvalue())


def compose(command: str = "train", overrides: tuple[str, ...] | list[str] = (), return_hydra: bool = False):
    """The config ``lbsgd <command> <overrides>`` runs with, composed by Hydra's compose API."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lbsgd_cli import cli

    cli._register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(cli.conf_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name=command, overrides=list(overrides), return_hydra_config=return_hydra)
    GlobalHydra.instance().clear()
    return cfg


_NEXT_PORT = [21000 + os.getpid() % 15000]


def free_port() -> int:
    """A free TCP port in [20000, 40000) (SLURM's is 20000 + job id mod 20000), never the same one twice."""
    while _NEXT_PORT[0] < 40000:
        port = _NEXT_PORT[0]
        _NEXT_PORT[0] += 7
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without SLURM's, torchrun's and the fault-injection variables, one thread."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "LBSGD_FAULT_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                          "MASTER_ADDR", "MASTER_PORT")}
    env.pop("HYDRA_FULL_ERROR", None)
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def run_weights(run: Path) -> dict[str, torch.Tensor]:
    """The model weights of a run directory's last checkpoint."""
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]


def max_abs_diff(a: Path, b: Path) -> float:
    """The largest absolute difference between the last checkpoints' weights of two run directories."""
    wa, wb = run_weights(a), run_weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def small_net(n: int = 4, bn_kernel: str = "native") -> torch.nn.Module:
    """A seeded ``small_cnn`` (width 8, 1 channel in) with ghost BN over ``n``, in training mode."""
    from omegaconf import OmegaConf

    from lbsgd_cli.config import ModelConfig
    from lbsgd_cli.models import build_model

    torch.manual_seed(0)
    cfg = OmegaConf.structured(ModelConfig(arch="small_cnn", width=8, bn_kernel=bn_kernel))
    return build_model(cfg, 10, 1, bn_group=n).train()


def small_batch(count: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded batch of ``count`` random 1x8x8 images and labels of 10 classes, for ``small_net``."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(count, 1, 8, 8, generator=g), torch.randint(0, 10, (count,), generator=g)
