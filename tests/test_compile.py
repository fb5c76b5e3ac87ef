"""compile=true (issue 13 item 5): torch.compile of the model gives eager's step within float tolerance."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from lbsgd_cli.config import ModelConfig, OptimConfig
from lbsgd_cli.engine import StepPlan, train_step
from lbsgd_cli.models import build_model
from lbsgd_cli.optim import build_optimizer


def _net(bn_kernel: str = "native") -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = OmegaConf.structured(ModelConfig(arch="small_cnn", width=8, bn_kernel=bn_kernel))
    return build_model(cfg, 10, 1, bn_group=4).train()


@pytest.mark.slow
@pytest.mark.parametrize("bn_kernel", ["native", "fused"])
def test_compiled_model_steps_like_eager(bn_kernel):
    """Two steps of the ghost-BN net over 2 passes of 2 workers, eager and compiled (in place: the same
    state dict keys): same weights and BN running statistics within float tolerance, same hits."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    plan = StepPlan(per_process=4, per_pass=2, n=4, loss_scale=1 / 16)
    results = []
    for compiled in (False, True):
        net = _net(bn_kernel)
        if compiled:
            net.compile()
        opt = build_optimizer(net, OmegaConf.structured(OptimConfig()), lr=0.1)
        steps = [train_step(net, opt, (x, y), plan) for _ in range(2)]
        results.append((copy.deepcopy(net.state_dict()), [(s.loss_sum, s.correct) for s in steps]))
    (eager, eager_steps), (comp, comp_steps) = results
    assert eager.keys() == comp.keys()
    for k, v in eager.items():
        torch.testing.assert_close(comp[k], v, rtol=1e-4, atol=1e-5)
    assert [c for _, c in eager_steps] == [c for _, c in comp_steps]
    assert [l for l, _ in comp_steps] == pytest.approx([l for l, _ in eager_steps], rel=1e-5)


# --------------------------------------------------------------------------- one graph with ghost BN (issue 23)
#
# torch._dynamo.explain traces without inductor (no compile): graph and graph-break counts in seconds.
# Before issue 23 ghost BN's training forward was torch.compiler.disable'd: ResNet-20 gave 15 graphs and
# 14 breaks, ResNet-50 26 and 25 (scripts/bench/explain_ghost_bn.py, results/performance.md).


def _explain(model_kw: dict, classes: int, shape: tuple[int, ...], kernel: str, mode: str):
    import torch._dynamo

    from lbsgd_cli.ghost_bn import deferred_running_stats

    torch.manual_seed(0)
    model = build_model(OmegaConf.structured(ModelConfig(bn_kernel=kernel, **model_kw)), classes, 3, bn_group=32)
    model.train(mode != "eval")
    torch._dynamo.reset()
    ctx = deferred_running_stats(model) if mode == "train" else torch.no_grad()
    with ctx:  # train: running statistics deferred, as train_step collects them
        out = torch._dynamo.explain(model)(torch.randn(shape))
    return out.graph_count, out.graph_break_count, [r.reason.splitlines()[0] for r in out.break_reasons]


@pytest.mark.slow  # dynamo traces the network (fused: inductor compiles it too)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kernel", ["native", "fused"])
def test_cifar_resnet20_with_ghost_bn_is_one_graph(kernel, mode):
    """CIFAR ResNet-20, batch 128, ghost BN over n = 32 (g = 4 workers per pass)."""
    graphs, breaks, reasons = _explain(dict(arch="cifar_resnet", depth=20), 10, (128, 3, 32, 32), kernel, mode)
    assert (graphs, breaks) == (1, 0), reasons


@pytest.mark.slow  # dynamo traces ResNet-50 (the CIFAR ResNet-20 cases stay fast)
@pytest.mark.parametrize("kernel,mode", [("native", "train"), ("fused", "train"), ("native", "eval")])
def test_resnet50_with_ghost_bn_is_one_graph(kernel, mode):
    """torchvision ResNet-50, batch 64, ghost BN over n = 32; 64x64 images trace the same graph as 224x224
    (graph breaks do not depend on the image size; scripts/bench/explain_ghost_bn.py runs 224) in less time.
    Eval mode is PyTorch's BN with either kernel (the CIFAR test runs both)."""
    graphs, breaks, reasons = _explain(dict(arch="resnet50"), 1000, (64, 3, 64, 64), kernel, mode)
    assert (graphs, breaks) == (1, 0), reasons


def test_static_batch_pads_the_last_validation_batch():
    """compile=true: evaluate pads a short batch to batch.eval_batch, so the compiled model sees one shape
    (CUDA graphs of compile_mode=reduce_overhead); the padding's outputs are dropped: same figures."""
    from lbsgd_cli.engine import evaluate

    net = _net().eval()
    shapes: list[tuple[int, ...]] = []
    net.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 1, 8, 8, generator=g), torch.randint(0, 10, (20,), generator=g)
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]
    padded = evaluate(net, batches, static_batch=8)
    assert shapes == [(8, 1, 8, 8)] * 3
    shapes.clear()
    plain = evaluate(net, batches)
    assert shapes[-1] == (4, 1, 8, 8) and padded["images"] == plain["images"] == 20
    assert padded == pytest.approx(plain, rel=1e-6)


def test_reduce_overhead_needs_equal_passes(tmp_path):
    """CUDA graphs replay one shape: workers per pass must divide the process's workers (a one-line error)."""
    from .conftest import SHORT, lbsgd

    res = lbsgd("train", f"hydra.run.dir={tmp_path / 'r'}", *SHORT, "batch.k=3", "batch.workers_per_pass=2",
                "compile=true", "compile_mode=reduce_overhead")
    assert res.returncode != 0 and "\n" not in res.stderr.strip()
    assert "batch.workers_per_pass: compile_mode=reduce_overhead replays CUDA graphs of one shape; 2 worker(s) " \
           "per pass do not divide the 3 of this process" in res.stderr
