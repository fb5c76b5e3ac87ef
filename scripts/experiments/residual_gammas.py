#!/usr/bin/env python
"""How strong each residual branch ended up: the mean |gamma| of every residual block's last BN, from checkpoints.

    python scripts/experiments/residual_gammas.py RUN_DIR_OR_CHECKPOINT... [--init]

Zero-gamma (§5.1, Table 2b: ``model.zero_init_residual``) starts the last BN of each residual block at
gamma = 0, so each block starts as its shortcut. Whether the branches grow back is what the learned gammas
say: this prints, per run, the mean |gamma| of each block's last BN (the branch's scale, in the order of the
blocks) and, for projection shortcuts (``model.shortcut=B``), of each projection's BN (the shortcut's
scale, which zero-gamma leaves at 1), and the channels zero-gamma left at exactly 0 for good
(``lbsgd_cli.models.zero_gamma_dead_channels``: with option-A shortcuts, the zero-padded ones).
A RUN_DIR is read at ``checkpoints/last.pt``. ``--init`` prints the
same for each run's network freshly initialised by its own config (the values before training), as a check.

Checkpoints are read as data only (``lbsgd_cli.checkpoint.load_checkpoint``: no code in them runs); the
network is built from the checkpoint's own config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from lbsgd_cli.checkpoint import load_checkpoint, load_model_state
from lbsgd_cli.errors import UserError
from lbsgd_cli.models import build_model, residual_last_bns, zero_gamma_dead_channels
from lbsgd_cli.restore import classes_and_channels


def network_of(ckpt: dict, init: bool) -> nn.Module:
    """The checkpoint's network, built from its config (classes and input channels from its weights)."""
    state = ckpt["model"]
    model = build_model(OmegaConf.create(ckpt["config"]["model"]), *classes_and_channels(state), None)
    if not init:
        load_model_state(model, state, "checkpoint")
    return model


def mean_abs_gammas(model: nn.Module) -> tuple[list[float], list[float]]:
    """Mean |gamma| of each residual block's last BN, and of each projection shortcut's BN, in block order."""
    branch = [bn.weight.detach().abs().mean().item() for bn in residual_last_bns(model)]
    proj = [m[1].weight.detach().abs().mean().item() for name, m in model.named_modules()
            if name.endswith(".proj") and isinstance(m, nn.Sequential)]
    return branch, proj


def checkpoint_path(arg: str) -> Path:
    path = Path(arg)
    return path / "checkpoints" / "last.pt" if path.is_dir() else path


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (their checkpoints/last.pt) or checkpoint files")
    ap.add_argument("--init", action="store_true", help="the networks as their configs initialise them instead")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for arg in args.runs:  # every checkpoint read before anything is printed: a bad one is the only output
        path = checkpoint_path(arg)
        try:
            ckpt = load_checkpoint(path)
        except UserError as exc:
            print(f"residual_gammas: {exc}", file=sys.stderr)
            return 2
        mcfg = ckpt["config"]["model"]
        model = network_of(ckpt, args.init)
        branch, proj = mean_abs_gammas(model)
        dead = ", ".join(f"{d} of {c} in {stage}" for stage, (d, c) in zero_gamma_dead_channels(model).items()) or "none"
        epoch = 0 if args.init else ckpt.get("epoch", "-")
        name = path.parent.parent.name if path.parent.name == "checkpoints" else path.name
        rows.append(f"| {name} | {epoch} | {mcfg['zero_init_residual']} | {mcfg.get('shortcut', 'A')} "
                    f"| {' '.join(f'{g:.2f}' for g in branch)} | {' '.join(f'{g:.2f}' for g in proj) or '-'} | {dead} |")
    print("| run | epoch | zero-gamma | shortcut | residual branches' last BN: mean \\|gamma\\| per block "
          "| projection BNs: mean \\|gamma\\| | channels dead for good (gamma = beta = 0 behind a zero shortcut) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
