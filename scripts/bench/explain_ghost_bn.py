"""Graph breaks of torch.compile (dynamo) through ghost BN, on the CPU (issue 23, part 2).

``torch._dynamo.explain`` traces a model without compiling it (no inductor): it reports how many graphs
dynamo made and how many graph breaks split them. Rows: torchvision ResNet-50 (batch 64, 224x224) and the
CIFAR ResNet-20 (batch 128, 32x32), both with ghost BN over n = 32, in train and eval mode, with
``model.bn_kernel=native`` and ``fused``. Usage::

    PYTHONPATH=. python scripts/bench/explain_ghost_bn.py [--no-r50]
"""

from __future__ import annotations

import argparse

import torch
import torch._dynamo
from omegaconf import OmegaConf

from lbsgd_cli.config import ModelConfig
from lbsgd_cli.ghost_bn import deferred_running_stats
from lbsgd_cli.models import build_model

CASES = {  # name: (model config, num classes, input shape)
    "resnet50": (dict(arch="resnet50"), 1000, (64, 3, 224, 224)),
    "resnet20": (dict(arch="cifar_resnet", depth=20), 10, (128, 3, 32, 32)),
}


MODES = ("train", "train deferred", "eval")  # deferred: running statistics as lbsgd's train_step collects them


def explain(arch: str, kernel: str, mode: str, n: int = 32, size: int | None = None):
    """``(graph_count, graph_break_count, first break reason or '')`` of one forward (``size``: another
    image side, e.g. a smaller one for a faster trace; graph breaks do not depend on it)."""
    model_kw, classes, shape = CASES[arch]
    if size is not None:
        shape = (*shape[:2], size, size)
    torch.manual_seed(0)
    cfg = OmegaConf.structured(ModelConfig(bn_kernel=kernel, **model_kw))
    model = build_model(cfg, classes, 3, bn_group=n).train(mode != "eval")
    torch._dynamo.reset()
    with deferred_running_stats(model) if mode == "train deferred" else torch.no_grad() if mode == "eval" else \
            torch.enable_grad():
        out = torch._dynamo.explain(model)(torch.randn(shape))
    reason = out.break_reasons[0].reason.splitlines()[0] if out.break_reasons else ""
    return out.graph_count, out.graph_break_count, reason


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-r50", action="store_true", help="ResNet-20 only")
    args = ap.parse_args()
    print(f"torch {torch.__version__}")
    print("| model | mode | bn_kernel | graphs | graph breaks | first break |\n|---|---|---|---|---|---|")
    for arch in ("resnet20",) if args.no_r50 else ("resnet50", "resnet20"):
        for mode in MODES:
            for kernel in ("native", "fused"):
                graphs, breaks, reason = explain(arch, kernel, mode)
                print(f"| {arch} | {mode} | {kernel} | {graphs} | {breaks} | {reason[:70]} |",
                      flush=True)


if __name__ == "__main__":
    main()
