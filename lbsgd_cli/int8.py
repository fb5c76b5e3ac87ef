"""Real 8-bit integer execution on the CPU: the PyTorch 2 export (pt2e) flow of torchao.

The seminar's point about quantization ("heavy DL-operations ... in integer scope using
efficient integer hardware") needs kernels, not simulation. The maintained path is:

1. ``torch.export`` the eval-mode fp32 network to an ATen graph;
2. ``prepare_pt2e`` with torchao's ``X86InductorQuantizer`` (int8 symmetric per-channel
   weights, uint8 affine per-tensor activations; BN is folded into the convs);
3. calibrate on a few training batches, ``convert_pt2e`` (quantize/dequantize pairs);
4. ``torch.compile`` (inductor with freezing) fuses each q/dq pattern into oneDNN int8
   convolutions and matmuls.

torchao is an optional dependency (``pip install lbsgd[int8]``). Latency is measured in
one process with fp32 and int8 repetitions interleaved (:func:`interleaved_latency`).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .errors import UserError


def plain_batchnorm(model: nn.Module) -> nn.Module:
    """Ghost BN (§2.3) is plain BN at inference: swap it back so the quantizer sees ``batch_norm``."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d) and type(child) is not nn.BatchNorm2d:
            bn = nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine,
                                track_running_stats=child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            setattr(model, name, bn)
        else:
            plain_batchnorm(child)
    return model


def _torchao():
    try:
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
    except ImportError as exc:
        raise UserError(f"quant.int8_backend needs torchao (pip install 'lbsgd[int8]'): {exc}") from None
    return prepare_pt2e, convert_pt2e, move_exported_model_to_eval, X86InductorQuantizer, \
        get_default_x86_inductor_quantization_config


def quantize_pt2e_int8(model: nn.Module, example: torch.Tensor, calib: Iterable[torch.Tensor]) -> nn.Module:
    """Steps 1-3 above: an exported graph with int8 q/dq around every conv and linear.

    The graph is specialised to ``example``'s shape (a fixed batch), as it is for deployment.
    """
    prepare_pt2e, convert_pt2e, to_eval, Quantizer, default_config = _torchao()
    fp32 = plain_batchnorm(copy.deepcopy(model)).eval()
    with torch.no_grad():
        exported = torch.export.export(fp32, (example,)).module()
        quantizer = Quantizer()
        quantizer.set_global(default_config())
        prepared = prepare_pt2e(exported, quantizer)
        b = example.shape[0]
        for x in calib:  # in slices of the graph's batch (a partial last slice is skipped)
            for part in x.split(b):
                if part.shape[0] == b:
                    prepared(part)
        converted = convert_pt2e(prepared)
    to_eval(converted)
    return converted


def compile_cpu(model: nn.Module) -> Callable:
    """Step 4: inductor with freezing (weights become constants, so int8 weights are prepacked)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(model)


@torch.no_grad()
def interleaved_latency(
    models: dict[str, Callable], x: torch.Tensor, reps: int = 30, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per forward of each model on ``x``, repetitions interleaved model by model.

    Interleaving makes a busy machine slow every model alike, so the ratios stay meaningful.
    """
    for _ in range(warmup):
        for f in models.values():
            f(x)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(reps):
        for name, f in models.items():
            t = time.perf_counter()
            f(x)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


@torch.no_grad()
def fixed_batch_eval(model: Callable, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], batch: int) -> float:
    """Top-1 error of a graph specialised to ``batch`` images: the last partial batch is zero-padded."""
    wrong = count = 0
    for x, y in batches:
        for s in range(0, x.shape[0], batch):
            xs, ys = x[s : s + batch], y[s : s + batch]
            m = xs.shape[0]
            if m < batch:
                xs = torch.cat([xs, xs.new_zeros(batch - m, *xs.shape[1:])])
            wrong += int((model(xs)[:m].argmax(1) != ys).sum())
            count += m
    return wrong / max(count, 1)
