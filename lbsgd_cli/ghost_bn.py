"""Ghost BatchNorm: BN statistics over exactly ``n`` samples per worker (§2.3).

In the paper each of the ``k`` workers normalises its own ``n`` samples, never
across workers. When one process holds several simulated workers, its batch of
``g*n`` samples is split along the batch dimension into ``g`` *views* of ``n``
samples each (the batch dimension is outermost in both NCHW and channels_last, so
every worker's slice is a dense tensor in the input's own memory format), and
:class:`_GhostBatchNormFn` runs PyTorch's native batch-norm kernel on each slice,
writing into slices of one preallocated output (and, in backward, of one input
gradient). No activation is transposed or copied, channels_last stays
channels_last, and with bf16/fp16 inputs the statistics are taken and kept in fp32
by the kernel itself (output in the input's dtype). ``g = 1`` is plain
:func:`torch.nn.functional.batch_norm`.

Why per-slice native kernels by default (measured on the CPU, one thread): run eagerly, formulas
that reduce over a ``(g, n, C, H, W)`` view and normalise by broadcasting were 1.3-9x slower per BN
layer (forward + backward) than the native kernel; the per-slice native calls make ResNet-20
training steps 1.2-1.5x faster than the former ``(g*n, C) -> (n, g*C)`` transpose in channels_last
and about as fast in NCHW (``results/performance.md``; measured by ``scripts/bench/bench_ghost_bn.py`` at
commit 6871f08, a comparison since retired). Compiled, the
same formulas beat both (below); they are opt-in because every new shape compiles first and
needs torch.compile's toolchain.

With ``kernel="fused"`` (``model.bn_kernel=fused``) the whole pass is instead normalised by one kernel
that torch.compile generates (C++ on a CPU, Triton on a GPU) from the formula written over a
``(g, n, C, H, W)`` view: statistics reduced in fp32 (float64 stays float64), the affine applied in the
same kernel, and a hand-written backward (two reductions and one elementwise pass). One kernel per layer
for any ``g``, in either memory format; on this project's CPU it is faster than both the per-slice calls
and PyTorch's plain batch norm (``results/performance.md``). Its first call per shape compiles (seconds).

Under torch.compile of the whole model (``compile=true``) neither autograd Function is traced: with
either kernel the training forward is :func:`_traced_forward`, the fused kernel's formula in plain tensor
ops (backward derived by AOTAutograd), and every running-statistic update is an in-place update of a
buffer, which dynamo and AOTAutograd trace as input mutation. The whole network is one graph (no graph
break; tests/test_compile.py), and inductor fuses BN with the layers around it. Eagerly the kernels above
run, as before; tests check the traced formula against them in float64.

Running statistics follow the paper's workers: every worker updates its own
running average with its own batch statistics; since the update is linear, the
average over workers of their running statistics is updated with the average over
workers of their batch statistics, once per iteration. That average is what this
module keeps (and what the workers' models would agree on after averaging).

Under :func:`deferred_running_stats` the update is postponed until the end of the
optimizer step, so that splitting a process's workers over several forward passes
(``batch.workers_per_pass``) or over several processes updates the running
statistics exactly as one pass over all ``k`` workers would.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError


_LOW_PRECISION = (torch.float16, torch.bfloat16)


class _GhostBatchNormFn(torch.autograd.Function):
    """Batch norm over each of ``g`` consecutive slices of ``n`` samples, one native kernel call per slice.

    ``mean_buf``/``var_buf`` (``(g, C)``, fp32 or the input's dtype) receive each group's mean and
    unbiased variance (the native kernel's running-stat update with momentum 1), or are ``None``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, n, eps, mean_buf, var_buf):  # noqa: D102
        g = x.shape[0] // n
        stat_dtype = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
        y = torch.empty_like(x)
        save_mean = torch.empty(g, x.shape[1], device=x.device, dtype=stat_dtype)
        save_invstd = torch.empty_like(save_mean)
        xs, ys = x.view(g, n, *x.shape[1:]).unbind(0), y.view(g, n, *x.shape[1:]).unbind(0)
        means, invstds = save_mean.unbind(0), save_invstd.unbind(0)
        rms = mean_buf.unbind(0) if mean_buf is not None else [None] * g
        rvs = var_buf.unbind(0) if var_buf is not None else [None] * g
        for i in range(g):
            torch.ops.aten.native_batch_norm.out(xs[i], weight, bias, rms[i], rvs[i], True, 1.0, eps,
                                                 out=ys[i], save_mean=means[i], save_invstd=invstds[i])
        ctx.save_for_backward(x, weight, save_mean, save_invstd)
        ctx.n, ctx.eps = n, eps
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):  # noqa: D102
        x, weight, save_mean, save_invstd = ctx.saved_tensors
        n = ctx.n
        g = x.shape[0] // n
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # The out= kernel fills all three outputs (a masked-out one is an error); dw and db are (g, C), cheap.
        w = weight if weight is not None else torch.ones_like(save_mean[0])
        dx, dw, db = torch.empty_like(x), torch.empty_like(save_mean), torch.empty_like(save_mean)
        shape = (g, n, *x.shape[1:])
        xs, dys, dxs = x.view(shape).unbind(0), dy.view(shape).unbind(0), dx.view(shape).unbind(0)
        dws, dbs = dw.unbind(0), db.unbind(0)
        for i in range(g):
            torch.ops.aten.native_batch_norm_backward.out(
                dys[i], xs[i], w, None, None, save_mean[i], save_invstd[i], True, ctx.eps,
                [True, True, True], out0=dxs[i], out1=dws[i], out2=dbs[i])
        return (dx if need_x else None, dw.sum(0).to(w.dtype) if need_w else None,
                db.sum(0).to(w.dtype) if need_b else None, None, None, None, None)


def _group_sum(t: torch.Tensor) -> torch.Tensor:
    """``(g, n, C, H*W)`` summed to ``(g, C)``: over each sample's pixels first (a contiguous run in NCHW),
    then over the group's samples; two simple reductions that compile to vectorised loops."""
    return t.sum(3).sum(1)


def _fused_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, n: int, eps: float):
    """Each group of ``n`` samples normalised by its own statistics: ``y``, group mean and biased var, invstd."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    g, c = x.shape[0] // n, x.shape[1]
    xg = x.reshape(g, n, c, -1).to(acc)        # a view: the batch dimension is outermost, H and W merge
    count = n * xg.shape[3]
    # two passes (mean, then the mean squared deviation), like PyTorch's CPU kernel
    mean = _group_sum(xg) / count                                            # (g, C)
    var = _group_sum((xg - mean[:, None, :, None]).square()) / count
    invstd = torch.rsqrt(var + eps)
    scale = weight.to(acc) * invstd
    shift = bias.to(acc) - mean * scale
    y = (x.to(acc) * _per_sample(scale, n, x) + _per_sample(shift, n, x)).to(x.dtype)  # x's shape: not a view
    return y, mean, var, invstd


def _per_sample(t: torch.Tensor, n: int, x: torch.Tensor) -> torch.Tensor:
    """A ``(g, C)`` per-group value as ``(g*n, C, 1, 1)``, broadcasting over ``x`` (an index in the kernel)."""
    g, c = t.shape
    return t[:, None].expand(g, n, c).reshape(g * n, c, *([1] * (x.dim() - 2)))


def _fused_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                    invstd: torch.Tensor, n: int):
    """BN's input gradient per group, and the weight and bias gradients summed over groups."""
    acc = mean.dtype
    g, c = x.shape[0] // n, x.shape[1]
    xg, dyg = x.reshape(g, n, c, -1).to(acc), dy.reshape(g, n, c, -1).to(acc)
    count = n * xg.shape[3]
    sum_dy = _group_sum(dyg)
    sum_dy_xhat = _group_sum(dyg * (xg - mean[:, None, :, None])) * invstd
    # dx = w*invstd * (dy - mean(dy) - xhat * mean(dy*xhat)), per group, computed in x's shape
    xhat = (x.to(acc) - _per_sample(mean, n, x)) * _per_sample(invstd, n, x)
    dx = _per_sample(weight.to(acc) * invstd, n, x) * (
        dy.to(acc) - _per_sample(sum_dy / count, n, x) - xhat * _per_sample(sum_dy_xhat / count, n, x))
    return dx.to(x.dtype), sum_dy_xhat.sum(0), sum_dy.sum(0)


_COMPILED: dict[str, object] = {}


def _compiled(name: str):
    """The fused forward or backward under torch.compile, built on first use (one compile per shape)."""
    if name not in _COMPILED:
        import torch._dynamo

        # Every layer shape, dtype and memory format is one compiled entry of the same function; a
        # ResNet-50 has more than dynamo's default limit of 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        fn = _fused_forward if name == "forward" else _fused_backward
        _COMPILED[name] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[name]


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What torch.compile raises when it cannot build a kernel (no C++ compiler, no Triton, a failed build)."""
    import torch._dynamo.exc
    import torch._inductor.exc

    return (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InvalidCxxCompiler,
            torch._inductor.exc.CppCompileError)


def _call_compiled(name: str, *args):
    try:
        with torch.autocast(args[0].device.type, enabled=False):
            return _compiled(name)(*args)
    except _compile_errors() as e:  # the toolchain, not the user's data: one line naming the key
        msg = str(e).strip().splitlines()
        raise UserError(f"model.bn_kernel=fused: torch.compile failed ({type(e).__name__}: "
                        f"{msg[0] if msg else ''}); use model.bn_kernel=native") from e


class _FusedGhostBatchNormFn(torch.autograd.Function):
    """Ghost BN over all ``g`` groups of a pass in one compiled kernel (forward) and one backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, n, eps, mean_buf, var_buf):  # noqa: D102
        y, mean, var, invstd = _call_compiled("forward", x, weight, bias, n, eps)
        if mean_buf is not None:  # the native kernel's momentum-1 update: this batch's mean and unbiased var
            count = x.numel() // (mean.shape[0] * x.shape[1])
            mean_buf.copy_(mean)
            var_buf.copy_(var * (count / max(count - 1, 1)))
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.n = n
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):  # noqa: D102
        x, weight, mean, invstd = ctx.saved_tensors
        dx, dw, db = _call_compiled("backward", dy, x, weight, mean, invstd, ctx.n)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (dx if need_x else None, dw.to(weight.dtype) if need_w else None,
                db.to(weight.dtype) if need_b else None, None, None, None, None)


def _traced_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, n: int, eps: float):
    """Ghost BN as plain tensor ops that torch.compile traces (``y``, group means, unbiased group variances).

    The fused kernel's formula over the ``(g, n, C, H*W)`` view; autograd (AOTAutograd under torch.compile)
    derives the backward, and inductor fuses both with the convolutions' neighbours. No custom autograd
    Function and no write into a scratch buffer: dynamo traces it without a graph break."""
    c = x.shape[1]
    weight = weight if weight is not None else torch.ones(c, device=x.device, dtype=x.dtype)
    bias = bias if bias is not None else torch.zeros(c, device=x.device, dtype=x.dtype)
    y, mean, var, _ = _fused_forward(x, weight, bias, n, eps)
    count = x.numel() // (mean.shape[0] * c)
    return y, mean.detach(), (var * (count / max(count - 1, 1))).detach()


def _traceable() -> bool:
    """Whether this forward is being traced by torch.compile (then ghost BN is :func:`_traced_forward`).

    Eagerly, the per-slice native calls (``native``) or the separately compiled kernel (``fused``) stay the
    faster choice; tests make this True to check the traced formula against them."""
    return torch.compiler.is_compiling()


class GhostBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are taken over groups of ``group_size`` samples.

    Under torch.compile (``compile=true``) the training forward is :func:`_traced_forward` and the running
    statistics move by in-place updates of buffers, which dynamo and AOTAutograd trace: the whole network is
    one graph. Pending (deferred) statistics live in three non-persistent buffers (``pending_mean``,
    ``pending_var``, ``pending_count``: not in the state dict), updated in place, so a deferred pass traces
    the same way; ``_dirty`` (a plain attribute, only ever set) tells :meth:`flush` whether there is anything
    to apply without reading the device."""

    def __init__(self, num_features: int, group_size: int, kernel: str = "native", **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if kernel not in ("native", "fused"):
            raise ValueError(f"GhostBatchNorm2d: kernel must be native or fused, not {kernel!r}")
        self.group_size = group_size
        self.kernel = kernel
        self.defer = False
        self._dirty = False  # pending statistics since the last flush
        if self.track_running_stats:
            like = self.running_mean
            self.register_buffer("pending_mean", torch.zeros_like(like), persistent=False)
            self.register_buffer("pending_var", torch.zeros_like(like), persistent=False)
            self.register_buffer("pending_count", torch.zeros((), dtype=torch.int64), persistent=False)
        else:
            self.pending_mean = self.pending_var = self.pending_count = None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}, kernel={self.kernel}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        return self._train_forward(x)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[0], x.shape[1]
        n = self.group_size
        if b % n:
            raise ValueError(f"GhostBatchNorm2d: batch {b} is not a multiple of the BN batch n={n}")
        g = b // n
        track = self.track_running_stats and self.running_mean is not None
        traced = _traceable()
        if g > 1 or self.kernel == "fused" or traced:  # F.batch_norm's checks (it makes them for one native group)
            if n * math.prod(x.shape[2:]) == 1:  # as on the former (n, g*C, ...) input
                raise ValueError("Expected more than 1 value per channel when training, "
                                 f"got input size {torch.Size([n, g * c, *x.shape[2:]])}")
            if self.eps <= 0.0:
                raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        if traced:
            y, mean_buf, var_buf = _traced_forward(x, self.weight, self.bias, n, self.eps)
            if track:
                self._update_running(mean_buf, var_buf)
            return y
        # momentum=1 turns the scratch buffers into this batch's per-group mean and unbiased var.
        stat_dtype = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
        mean_buf = torch.zeros(g, c, device=x.device, dtype=stat_dtype) if track else None
        var_buf = torch.ones(g, c, device=x.device, dtype=stat_dtype) if track else None
        if self.kernel == "fused":
            weight = self.weight if self.weight is not None else torch.ones(c, device=x.device)
            bias = self.bias if self.bias is not None else torch.zeros(c, device=x.device)
            y = _FusedGhostBatchNormFn.apply(x, weight, bias, n, self.eps, mean_buf, var_buf)
        elif g == 1:
            y = F.batch_norm(x, mean_buf.view(c) if track else None, var_buf.view(c) if track else None,
                             self.weight, self.bias, True, 1.0, self.eps)
        else:
            y = _GhostBatchNormFn.apply(x, self.weight, self.bias, n, self.eps, mean_buf, var_buf)
        if track:
            self._update_running(mean_buf, var_buf)
        return y

    @torch.no_grad()
    def _update_running(self, means: torch.Tensor, vars_: torch.Tensor) -> None:
        # No host->device copy here: the group count enters through an in-place add on the device.
        if self.defer:
            self.pending_mean.add_(means.sum(0).to(self.pending_mean.dtype))
            self.pending_var.add_(vars_.sum(0).to(self.pending_var.dtype))
            self.pending_count.add_(means.shape[0])
            self._dirty = True
            return
        self._apply_update(means.mean(0), vars_.mean(0))

    @torch.no_grad()
    def _apply_update(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is not None:
            momentum = self.momentum
        else:  # cumulative average: 1/num_batches_tracked, computed on the device (no host read)
            momentum = self.num_batches_tracked.to(self.running_mean.dtype).reciprocal()
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(var.to(self.running_var.dtype), momentum)

    def pending_stats(self) -> list[torch.Tensor] | None:
        """Sums of group means and variances since the last flush, and the group count (the buffers
        themselves); None when nothing is pending."""
        if not self._dirty or self.pending_mean is None:
            return None
        return [self.pending_mean, self.pending_var, self.pending_count]

    @torch.no_grad()
    def restore_pending_stats(self, pending: list[torch.Tensor] | None) -> None:
        """Put back pending sums saved from :meth:`pending_stats` (e.g. by a clone before a recomputation).

        Activation checkpointing recomputes forward passes; restoring the pending sums taken before
        the recomputation keeps it from counting a batch's statistics twice.
        """
        if self.pending_mean is None:
            return
        if pending is None:
            self._clear_pending()
            return
        for buf, value in zip((self.pending_mean, self.pending_var, self.pending_count), pending):
            buf.copy_(value)
        self._dirty = True

    @torch.no_grad()
    def _clear_pending(self) -> None:
        self.pending_mean.zero_()
        self.pending_var.zero_()
        self.pending_count.zero_()
        self._dirty = False

    @torch.no_grad()
    def flush(self, pending: list[torch.Tensor] | None = None) -> None:
        """Apply the deferred update: running stats move once, towards the mean over all groups."""
        pending = self.pending_stats() if pending is None else pending
        if pending is None:
            return
        count = pending[2].to(pending[0].dtype)
        mean, var = pending[0] / count, pending[1] / count
        self._clear_pending()
        self._apply_update(mean, var)


def ghost_bn_layers(model: nn.Module) -> list[GhostBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, GhostBatchNorm2d)]


@contextlib.contextmanager
def deferred_running_stats(model: nn.Module) -> Iterator[list[GhostBatchNorm2d]]:
    """Collect BN batch statistics during the block; the caller flushes them once per step."""
    layers = ghost_bn_layers(model)
    for m in layers:
        m.defer = True
    try:
        yield layers
    finally:
        for m in layers:
            m.defer = False


def flush_running_stats(layers: list[GhostBatchNorm2d], reduce=None) -> None:
    """Apply the deferred running-stat updates; ``reduce`` sums pending stats across processes."""
    if reduce is not None and layers:
        flat = [t for m in layers for t in (m.pending_stats() or [])]
        if len(flat) == 3 * len(layers):
            reduce(flat)
    for m in layers:
        m.flush()


def convert_to_ghost_bn(module: nn.Module, group_size: int, kernel: str = "native") -> nn.Module:
    """Replace every ``BatchNorm2d`` by a :class:`GhostBatchNorm2d` with the same state."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GhostBatchNorm2d):
            new = GhostBatchNorm2d(
                child.num_features,
                group_size,
                kernel,
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=child.track_running_stats,
            )
            new.load_state_dict(child.state_dict())
            new.to(device=next(iter(child.buffers()), torch.empty(0)).device)
            setattr(module, name, new)
        else:
            convert_to_ghost_bn(child, group_size, kernel)
    return module
