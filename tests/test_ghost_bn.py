"""Ghost BN (§2.3): BN over each worker's n samples, in one vectorised pass."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lbsgd_cli.ghost_bn import (
    GhostBatchNorm2d,
    convert_to_ghost_bn,
    deferred_running_stats,
    flush_running_stats,
)


def _pair(c=5, n=4, momentum=0.1):
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(c, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
    ghost = GhostBatchNorm2d(c, n, momentum=momentum)
    ghost.load_state_dict(ref.state_dict())
    return ref, ghost


def test_outputs_and_grads_equal_bn_per_group():
    ref, ghost = _pair()
    g, n = 3, 4
    x = torch.randn(g * n, 5, 6, 6) * 3 + 1
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ghost = ghost(x1)
    per_group = [copy.deepcopy(ref) for _ in range(g)]
    y_ref = torch.cat([per_group[i](x2[i * n : (i + 1) * n]) for i in range(g)])
    torch.testing.assert_close(y_ghost, y_ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(y_ref)
    (y_ghost * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    grad_w_ref = sum(m.weight.grad for m in per_group)
    torch.testing.assert_close(ghost.weight.grad, grad_w_ref, rtol=1e-4, atol=1e-5)


def test_running_stats_are_the_workers_average():
    """Each worker's BN updates its own running stats; the kept stats are their average."""
    ref, ghost = _pair()
    g, n = 4, 4
    x = torch.randn(g * n, 5, 3, 3) * 2 - 1
    ghost(x)
    workers = [copy.deepcopy(ref) for _ in range(g)]
    for i, m in enumerate(workers):
        m(x[i * n : (i + 1) * n])
    torch.testing.assert_close(ghost.running_mean, torch.stack([m.running_mean for m in workers]).mean(0))
    torch.testing.assert_close(ghost.running_var, torch.stack([m.running_var for m in workers]).mean(0))
    assert int(ghost.num_batches_tracked) == 1  # once per iteration, as each worker does


def test_single_group_is_plain_batchnorm():
    ref, ghost = _pair(n=8)
    x = torch.randn(8, 5, 4, 4)
    torch.testing.assert_close(ghost(x), ref(x))
    torch.testing.assert_close(ghost.running_var, ref.running_var)


def test_eval_mode_uses_running_stats():
    ref, ghost = _pair()
    ref.eval(), ghost.eval()
    x = torch.randn(6, 5, 4, 4)
    torch.testing.assert_close(ghost(x), ref(x))


def test_deferred_update_over_several_passes_equals_one_pass():
    _, one = _pair()
    _, split = _pair()
    x = torch.randn(16, 5, 3, 3)
    one(x)
    model = nn.Sequential(split)
    with deferred_running_stats(model) as layers:
        split(x[:8])
        split(x[8:])
        torch.testing.assert_close(split.running_mean, _pair()[1].running_mean)  # untouched until flushed
    flush_running_stats(layers)
    torch.testing.assert_close(split.running_mean, one.running_mean)
    torch.testing.assert_close(split.running_var, one.running_var)
    assert int(split.num_batches_tracked) == 1


def test_batch_not_multiple_of_n_is_an_error():
    _, ghost = _pair(n=4)
    with pytest.raises(ValueError, match="multiple of the BN batch"):
        ghost(torch.randn(6, 5, 2, 2))


def test_convert_keeps_state():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    net[1].running_mean.fill_(0.3)
    convert_to_ghost_bn(net, 2)
    assert isinstance(net[1], GhostBatchNorm2d) and isinstance(net[2][0], GhostBatchNorm2d)
    assert net[1].group_size == 2 and float(net[1].running_mean[0]) == pytest.approx(0.3)


# --------------------------------------------------------------------------- the copy-free ghost BN against the former one
#
# _ReferenceGhostBN is the former algorithm, kept here as the reference: the batch transposed to
# (n, g*C, H, W) so that one batch_norm call normalises each (worker, channel) pair.


class _ReferenceGhostBN(nn.BatchNorm2d):
    def __init__(self, num_features: int, group_size: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.group_size = group_size
        self.defer = False
        self._pending = None

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        b, c = x.shape[0], x.shape[1]
        n = self.group_size
        g = b // n
        xt = x.reshape(g, n, c, *x.shape[2:]).transpose(0, 1).reshape(n, g * c, *x.shape[2:])
        weight = self.weight.repeat(g) if self.weight is not None else None
        bias = self.bias.repeat(g) if self.bias is not None else None
        dt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        mean_buf = torch.zeros(g * c, dtype=dt)
        var_buf = torch.ones_like(mean_buf)
        track = self.track_running_stats and self.running_mean is not None
        y = nn.functional.batch_norm(xt, mean_buf if track else None, var_buf if track else None, weight, bias,
                                     True, 1.0, self.eps)
        if track:
            means, vars_ = mean_buf.view(g, c), var_buf.view(g, c)
            with torch.no_grad():
                if self.defer:
                    if self._pending is None:
                        self._pending = [means.sum(0), vars_.sum(0), torch.tensor(g)]
                    else:
                        self._pending[0] += means.sum(0)
                        self._pending[1] += vars_.sum(0)
                        self._pending[2] += g
                else:
                    self._apply_update(means.mean(0), vars_.mean(0))
        return y.reshape(n, g, c, *x.shape[2:]).transpose(0, 1).reshape(x.shape)

    @torch.no_grad()
    def _apply_update(self, mean, var):
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(var.to(self.running_var.dtype), momentum)

    def flush(self):
        p, self._pending = self._pending, None
        self._apply_update(p[0] / p[2].to(p[0].dtype), p[1] / p[2].to(p[0].dtype))


def _new_and_reference(c, n, dtype=torch.float64, kernel="native", **kw):
    torch.manual_seed(1)
    new = GhostBatchNorm2d(c, n, _k(kernel), **kw).to(dtype)
    ref = _ReferenceGhostBN(c, n, **kw).to(dtype)
    with torch.no_grad():
        if new.affine:
            new.weight.uniform_(0.5, 1.5)
            new.bias.uniform_(-0.5, 0.5)
        if new.track_running_stats:
            new.running_mean.uniform_(-1, 1)
            new.running_var.uniform_(0.5, 2)
    ref.load_state_dict(new.state_dict())
    return new, ref


_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _close(name, a, b, tol=1e-12):
    """Equal within float64 roundoff: ``tol`` relative to the quantity's scale."""
    diff = float((a - b).detach().abs().max()) if a.numel() else 0.0
    assert diff <= tol * max(1.0, float(b.detach().abs().max())), f"{name}: {diff}"


def _run_both(new, ref, x, dy, mode="train"):
    out = []
    for m in (new, ref):
        m.train(mode == "train")
        for p in m.parameters():
            p.grad = None
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.backward(dy)
        out.append((y, xi.grad, [p.grad for p in m.parameters()]))
    return out


# model.bn_kernel: one native call per worker's slice | one compiled kernel; "traced": the plain-op formula
# that torch.compile traces (compile=true, either key value), run eagerly here (the autouse fixture below)
# the fused kernel compiles with inductor (tens of seconds of CPU per test): slow tier; native and traced stay fast
FUSED = pytest.param("fused", marks=pytest.mark.slow)
KERNELS = ["native", FUSED, "traced"]


def _k(kernel: str) -> str:
    """The model.bn_kernel value of a test kernel ("traced" is what either becomes under torch.compile)."""
    return "native" if kernel == "traced" else kernel


@pytest.fixture(autouse=True)
def _traced_kernel(request, monkeypatch):
    """A test parametrized with kernel="traced" runs ghost BN's torch.compile path (_traced_forward) eagerly."""
    params = getattr(request.node, "callspec", None)
    if params is not None and params.params.get("kernel") == "traced":
        from lbsgd_cli import ghost_bn

        monkeypatch.setattr(ghost_bn, "_traceable", lambda: True)


# the fused kernel at g = 1 and 4 in training (g = 32 is g = 4's code at another size, one more compile;
# evaluation runs PyTorch's BN with either kernel)
_CASES = [(g, fmt, mode, "native") for g in (1, 4, 32) for fmt in _FORMATS for mode in ("train", "eval")] + \
         [pytest.param(g, fmt, "train", "fused", marks=pytest.mark.slow) for g in (1, 4) for fmt in _FORMATS] + \
         [(g, fmt, "train", "traced") for g in (1, 4, 32) for fmt in _FORMATS]


@pytest.mark.parametrize("g,fmt,mode,kernel", _CASES)
def test_copy_free_equals_former_algorithm_float64(g, fmt, mode, kernel):
    c, n = 6, 3
    new, ref = _new_and_reference(c, n, kernel=kernel)
    x = (torch.randn(g * n, c, 5, 4, dtype=torch.float64) * 3 + 1).contiguous(memory_format=_FORMATS[fmt])
    dy = torch.randn(g * n, c, 5, 4, dtype=torch.float64).contiguous(memory_format=_FORMATS[fmt])
    for _ in range(2):  # two steps: running statistics move twice
        (y, dx, grads), (y_ref, dx_ref, grads_ref) = _run_both(new, ref, x, dy, mode)
    _close("output", y, y_ref)
    _close("grad_input", dx, dx_ref)
    _close("grad_weight", grads[0], grads_ref[0])
    _close("grad_bias", grads[1], grads_ref[1])
    _close("running_mean", new.running_mean, ref.running_mean)
    _close("running_var", new.running_var, ref.running_var)
    assert int(new.num_batches_tracked) == int(ref.num_batches_tracked) == (2 if mode == "train" else 0)
    if mode == "train":
        assert y.is_contiguous(memory_format=_FORMATS[fmt]) and dx.is_contiguous(memory_format=_FORMATS[fmt])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt", list(_FORMATS))
def test_deferred_passes_and_cumulative_momentum_equal_former_algorithm(fmt, kernel):
    """Several passes under deferred_running_stats, flushed once; momentum=None (cumulative average)."""
    for momentum in (0.1, None):
        new, ref = _new_and_reference(4, 2, kernel=kernel, momentum=momentum)
        for step in range(3):
            x = torch.randn(16, 4, 3, 3, dtype=torch.float64).contiguous(memory_format=_FORMATS[fmt])
            with deferred_running_stats(nn.Sequential(new)) as layers:
                ref.defer = True
                for part in (x[:4], x[4:]):  # 2 then 6 workers per pass
                    new(part)
                    ref(part)
            ref.defer = False
            flush_running_stats(layers)
            ref.flush()
            _close("running_mean", new.running_mean, ref.running_mean)
            _close("running_var", new.running_var, ref.running_var)
        assert int(new.num_batches_tracked) == 3


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradient_in_the_other_memory_format(kernel):
    """Autograd may hand back an NCHW gradient for a channels_last output (and the reverse)."""
    for fmt, other in (("channels_last", "nchw"), ("nchw", "channels_last")):
        new, ref = _new_and_reference(4, 2, kernel=kernel)
        x = torch.randn(8, 4, 3, 5, dtype=torch.float64).contiguous(memory_format=_FORMATS[fmt])
        dy = torch.randn(8, 4, 3, 5, dtype=torch.float64).contiguous(memory_format=_FORMATS[other])
        (y, dx, grads), (y_ref, dx_ref, grads_ref) = _run_both(new, ref, x, dy)
        _close("grad_input", dx, dx_ref)
        _close("grad_weight", grads[0], grads_ref[0])


@pytest.mark.parametrize("kernel", KERNELS)
def test_no_affine_no_tracking_and_frozen_input_equal_former_algorithm(kernel):
    x = torch.randn(12, 3, 4, 4, dtype=torch.float64)
    dy = torch.randn_like(x)
    for kw in ({"affine": False}, {"track_running_stats": False}):
        new, ref = _new_and_reference(3, 3, kernel=kernel, **kw)
        (y, dx, _), (y_ref, dx_ref, _) = _run_both(new, ref, x, dy)
        _close("output", y, y_ref)
        _close("grad_input", dx, dx_ref)
    new, ref = _new_and_reference(3, 3, kernel=kernel)
    for m in (new, ref):  # input that needs no gradient: weight and bias gradients only
        m(x).mul(dy).sum().backward()
    _close("grad_weight", new.weight.grad, ref.weight.grad)
    _close("grad_bias", new.bias.grad, ref.bias.grad)


@pytest.mark.parametrize("kernel", KERNELS)
def test_one_value_per_channel_is_still_an_error(kernel):
    _, ghost = _pair(n=1)
    ghost.kernel = _k(kernel)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ghost(torch.randn(4, 5, 1, 1))


def test_forward_makes_no_host_to_device_tensor(monkeypatch):
    """The pending group count is filled on the device: no torch.tensor(int, device=...) per BN layer."""
    _, ghost = _pair(n=2)

    def forbidden(*a, **k):
        raise AssertionError("torch.tensor in the forward pass")

    monkeypatch.setattr(torch, "tensor", forbidden)
    with deferred_running_stats(nn.Sequential(ghost)) as layers:
        ghost(torch.randn(8, 5, 2, 2))
        ghost(torch.randn(4, 5, 2, 2))
    flush_running_stats(layers)
    assert int(ghost.num_batches_tracked) == 1


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt", list(_FORMATS))
def test_bf16_autocast_keeps_fp32_statistics(fmt, kernel):
    torch.manual_seed(0)
    ghost = GhostBatchNorm2d(8, 4, _k(kernel))
    fp32 = copy.deepcopy(ghost)
    x = (torch.randn(16, 8, 6, 6) * 2 + 0.5).contiguous(memory_format=_FORMATS[fmt])
    xb = x.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ghost(xb)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16 and y.is_contiguous(memory_format=_FORMATS[fmt])
    assert ghost.running_mean.dtype == ghost.running_var.dtype == ghost.weight.grad.dtype == torch.float32
    y32 = fp32(x.to(torch.bfloat16).float())  # same rounded input, fp32 arithmetic
    torch.testing.assert_close(y.float(), y32, rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(ghost.running_mean, fp32.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ghost.running_var, fp32.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # the fused kernel compiles
@pytest.mark.parametrize("fmt", list(_FORMATS))
def test_fused_bf16_is_as_close_to_float64_as_native(fmt):
    """bf16 input: the fused kernel's output and gradients are within the native kernel's distance of a
    float64 computation from the same rounded input (both reduce in fp32, round the output to bf16)."""
    torch.manual_seed(0)
    x = (torch.randn(32, 6, 5, 5) * 3 + 1).to(torch.bfloat16).contiguous(memory_format=_FORMATS[fmt])
    dy = torch.randn(32, 6, 5, 5).to(torch.bfloat16).contiguous(memory_format=_FORMATS[fmt])
    base = GhostBatchNorm2d(6, 4)
    with torch.no_grad():
        base.weight.uniform_(0.5, 1.5)
        base.bias.uniform_(-1, 1)
    res = {}
    for kernel, dtype in (("native", torch.bfloat16), ("fused", torch.bfloat16), ("float64", torch.float64)):
        m = copy.deepcopy(base).to(torch.float64 if dtype == torch.float64 else torch.float32)
        m.kernel = "native" if kernel == "float64" else kernel
        xi = x.detach().to(dtype).clone().requires_grad_(True)
        y = m(xi)
        y.backward(dy.to(dtype))
        res[kernel] = [t.detach().double() for t in (y, xi.grad, m.weight.grad, m.bias.grad)]
    for name, fused, native, exact in zip(("output", "grad_input", "grad_weight", "grad_bias"),
                                          res["fused"], res["native"], res["float64"]):
        err_fused, err_native = float((fused - exact).abs().max()), float((native - exact).abs().max())
        assert err_fused <= 1.5 * err_native + 1e-5, f"{name}: fused {err_fused:.2e}, native {err_native:.2e}"


@pytest.mark.slow  # the fused kernel compiles
def test_fused_groups_are_bit_exact_across_pass_sizes():
    """What 1-vs-W bit-exactness needs of a BN kernel: a worker's output and input gradient do not depend
    on how many other workers share its pass (README "Guarantee"). The fused kernel reduces each group in
    the same order whatever g is."""
    torch.manual_seed(0)
    m = GhostBatchNorm2d(6, 4, "fused")
    x = torch.randn(16, 6, 5, 5) * 2 + 1
    dy = torch.randn_like(x)
    whole = x.clone().requires_grad_(True)
    y = m(whole)
    y.backward(dy)
    for i in range(4):
        part = x[4 * i: 4 * i + 4].clone().requires_grad_(True)
        y_part = m(part)
        y_part.backward(dy[4 * i: 4 * i + 4])
        assert torch.equal(y_part, y[4 * i: 4 * i + 4]) and torch.equal(part.grad, whole.grad[4 * i: 4 * i + 4])


def test_fused_compile_failure_is_one_user_error(monkeypatch):
    """No C++ compiler (or any torch.compile failure): one line naming the key and the way out."""
    from lbsgd_cli import ghost_bn
    from lbsgd_cli.errors import UserError

    import torch._inductor.exc

    def broken(name):
        def fail(*a):
            raise torch._inductor.exc.InvalidCxxCompiler()
        return fail

    monkeypatch.setattr(ghost_bn, "_compiled", broken)
    _, ghost = _pair(n=2)
    ghost.kernel = "fused"
    with pytest.raises(UserError, match=r"model.bn_kernel=fused: torch.compile failed \(InvalidCxxCompiler: No working "
                                        r"C\+\+ compiler.*use model.bn_kernel=native") as e:
        ghost(torch.randn(4, 5, 2, 2))
    assert "\n" not in str(e.value)

    def bug(name):  # anything else is not the toolchain: it propagates as it is
        def fail(*a):
            raise RuntimeError("a bug")
        return fail

    monkeypatch.setattr(ghost_bn, "_compiled", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        ghost(torch.randn(4, 5, 2, 2))


def test_unknown_kernel_is_an_error():
    with pytest.raises(ValueError, match="native or fused"):
        GhostBatchNorm2d(4, 2, "cudnn")
