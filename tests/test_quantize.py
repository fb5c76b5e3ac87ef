"""``lbsgd quantize``: the seminar's formulas, range setting, packing, the integer checkpoint, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lbsgd_cli.errors import UserError
from lbsgd_cli.evaluate import load_model_for_eval
from lbsgd_cli.quantize import (
    QTensor,
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

from .conftest import lbsgd, run_cli


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


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """The embedded default (digits, small CNN), trained as `lbsgd train` does by default."""
    run = tmp_path_factory.mktemp("train")
    proc = run_cli("train", f"hydra.run.dir={run}", "threads=1", "log.progress=none", "log.tensorboard=false")
    assert proc.returncode == 0, proc.stderr
    return run / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def quantized(digits_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantize")
    proc = run_cli("quantize", f"checkpoint={digits_model}", f"hydra.run.dir={out}", "threads=1",
                   "quant.bits=[8,4]", "quant.activations=[false,true]", "quant.calib_batches=2")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
def test_8bit_per_channel_changes_the_default_models_error_by_at_most_half_a_point(quantized):
    result = json.loads((quantized / "quantize.json").read_text())
    rows = {(r["bits"], r["activations"]): r for r in result["rows"]}
    assert set(rows) == {(8, False), (8, True), (4, False), (4, True)}
    for r in (rows[8, False], rows[8, True]):
        assert r["granularity"] == "per_channel" and abs(r["delta"]) <= 0.005
        assert r["quant_bytes"] < r["fp32_bytes"] / 3.5
    assert rows[4, False]["quant_bytes"] < rows[8, False]["quant_bytes"] * 0.6  # two 4-bit values per byte
    assert {"bits", "granularity", "symmetric", "method", "activations", "fp32_top1_err", "quant_top1_err",
            "delta", "fp32_bytes", "quant_bytes"} <= rows[8, False].keys()
    table = (quantized / "quantize_table.csv").read_text().splitlines()
    assert table[0].startswith("bits,granularity") and len(table) == 5
    assert (quantized / "quantize_table.md").exists()


@pytest.mark.slow
def test_integer_checkpoint_round_trips(quantized):
    for name in ("w4_per_channel_sym_minmax.pt", "w8_per_channel_sym_minmax_a8.pt"):
        path = quantized / "quantized" / name
        raw = torch.load(path, weights_only=False)
        assert raw["format"] == "lbsgd-quantized-v1" and raw["config"]["model"]["arch"] == "small_cnn"
        model, cfg = load_model_for_eval(path)  # as lbsgd eval reads it
        params = dict(model.named_parameters())
        for key, d in raw["qweights"].items():
            assert d["data"].dtype == torch.int8 and d["zero_point"].dtype == torch.int32
            assert torch.equal(params[key].detach(), QTensor.from_dict(d).dequantize())
        assert bool(raw["activations"]) == name.endswith("_a8.pt")
        x = torch.randn(2, 1, 8, 8)
        model2, _ = load_model_for_eval(path)
        assert torch.equal(model(x), model2(x))


@pytest.mark.parametrize(
    "override,message",
    [
        ("quant.bits=9", "quant.bits: must be an integer from 2 to 8"),
        ("quant.bits=[8,1]", "quant.bits: must be an integer from 2 to 8"),
        ("quant.granularity=per_row", "quant.granularity: unknown granularity 'per_row'"),
        ("quant.method=kl", "quant.method: unknown method 'kl'"),
    ],
)
def test_bad_settings_are_one_line_errors(override, message, tmp_path):
    proc = lbsgd("quantize", f"checkpoint={tmp_path}", override)
    assert proc.returncode == 2 and proc.stderr.startswith(f"lbsgd: error: {message}")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_checkpoint_that_is_not_a_model_is_a_one_line_error(tmp_path, quantized):
    from omegaconf import OmegaConf

    from lbsgd_cli.quantize_run import load_source

    bad = tmp_path / "notes.pt"
    torch.save({"hello": 1}, bad)
    for path, message in ((tmp_path / "missing.pt", "does not exist"),
                          (quantized / "quantized" / "w8_per_channel_sym_minmax.pt", "is already quantized")):
        with pytest.raises(UserError, match=message):
            load_source(OmegaConf.create({"checkpoint": str(path), "data_root": None}), torch.device("cpu"))
    proc = run_cli("quantize", f"checkpoint={bad}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and proc.stderr.startswith("lbsgd: error: checkpoint: "), proc.stderr
    assert "was not written by lbsgd" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_lbsgd_eval_reads_the_quantized_checkpoint(quantized, tmp_path):
    result = json.loads((quantized / "quantize.json").read_text())
    row = next(r for r in result["rows"] if r["bits"] == 4 and r["activations"])
    proc = run_cli("eval", f"checkpoint={row['path']}", f"hydra.run.dir={tmp_path}", "threads=1")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["top1_err"] == pytest.approx(row["quant_top1_err"])
