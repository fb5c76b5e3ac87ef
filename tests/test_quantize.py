"""lbsgd_cli/quantize.py: the seminar's formulas, range setting and packing (the command and its integer
checkpoint: test_quantize_run.py)."""

from __future__ import annotations

import math

import pytest
import torch

from lbsgd_cli.errors import UserError
from lbsgd_cli.quantize import (
    choose_range,
    dequantize,
    fake_quantize,
    int_range,
    pack,
    qparams,
    quantize,
    quantize_tensor,
    unpack,
)


def test_zero_point_is_rounded_not_truncated_and_integer():
    a, b = -0.35, 1.0  # (b a_q - a b_q)/(b - a) = -61.89 at 8 bits: round -62, truncation -61
    s, z = qparams(a, b, 8, symmetric=False)
    exact = (b * -128 - a * 127) / (b - a)
    assert z.dtype == torch.int32 and int(z) == round(exact) == -62 != math.trunc(exact)
    assert float(s) == pytest.approx((b - a) / 255)
    s, z = qparams(-0.5, 2.0, 4, symmetric=True)  # symmetric: a = -b = -max|x|, so z = 0
    assert int(z) == 0 and float(s) == pytest.approx(2.0 / 7)
    assert int_range(2, True) == (-1, 1) and int_range(8, False) == (-128, 127)
    with pytest.raises(UserError):
        int_range(9, False)


@pytest.mark.parametrize("bits,symmetric", [(8, False), (4, False), (3, True), (2, False)])
def test_round_trip_error_is_at_most_half_a_step_inside_and_clips_outside(bits, symmetric):
    a, b = -0.7, 1.3
    s, z = qparams(a, b, bits, symmetric)
    a_q, b_q = int_range(bits, symmetric)
    lo, hi = float(s * (a_q - z)), float(s * (b_q - z))  # the representable range covers [a, b] up to s/2
    assert lo <= a + float(s) / 2 + 1e-6 and hi >= b - float(s) / 2 - 1e-6
    x = torch.linspace(a, b, 10001)
    q = quantize(x, s, z, a_q, b_q)
    assert q.dtype == torch.int8 and int(q.min()) >= a_q and int(q.max()) <= b_q
    assert (dequantize(q, s, z) - x).abs().max() <= float(s) / 2 + 1e-6
    outside = torch.tensor([lo - 5.0, hi + 5.0, hi + 1e3])
    assert quantize(outside, s, z, a_q, b_q).tolist() == [a_q, b_q, b_q]
    assert fake_quantize(outside, s, z, a_q, b_q).tolist() == pytest.approx([lo, hi, hi], abs=1e-6)


def test_per_channel_scales_follow_the_output_channels():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3) * torch.tensor([1.0, 10.0, 100.0, 0.01]).view(4, 1, 1, 1)
    qc = quantize_tensor(w, 8, per_channel=True, symmetric=True, method="minmax")
    assert qc.scale.shape == (4,) and qc.zero_point.shape == (4,)
    amax = w.abs().amax(dim=(1, 2, 3))
    assert torch.allclose(qc.scale, amax / 127)  # one scale per row w[c]
    assert ((qc.dequantize() - w).abs() <= qc.scale.view(4, 1, 1, 1) / 2 + 1e-6).all()
    qt = quantize_tensor(w, 8, per_channel=False, symmetric=True, method="minmax")
    assert qt.scale.shape == () and float(qt.scale) == pytest.approx(float(amax.max()) / 127)
    err = lambda t: float((t.dequantize() - w)[3].abs().max())  # noqa: E731 (the smallest channel)
    assert err(qc) < err(qt) / 100


def test_mse_range_lowers_the_error_and_percentile_clips_outliers():
    torch.manual_seed(0)
    w = torch.randn(64, 512)
    w[:, 0] = 8.0  # one outlier per row stretches the min-max range
    err = {}
    for method in ("minmax", "mse"):
        qt = quantize_tensor(w, 4, per_channel=True, symmetric=False, method=method)
        err[method] = float((qt.dequantize() - w).pow(2).mean())
    assert err["mse"] < 0.8 * err["minmax"]
    lo, hi = choose_range(w, True, "percentile", 4, False, 99.0)
    assert (lo > w.amin(1)).all() and (hi < 4.0).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_packing_round_trips_and_shrinks(bits):
    a_q, b_q = int_range(bits, False)
    q = torch.randint(a_q, b_q + 1, (1001,), dtype=torch.int8)
    p = pack(q, a_q, bits)
    assert p.dtype == torch.int8 and torch.equal(unpack(p, a_q, bits, q.numel()), q)
    assert p.numel() == math.ceil(1001 / {2: 4, 3: 2, 4: 2}.get(bits, 1))


# --------------------------------------------------------------------------- the command, end to end
