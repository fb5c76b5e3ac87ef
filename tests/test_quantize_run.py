"""``lbsgd quantize`` (lbsgd_cli/quantize_run.py): the table of settings against fp32, the integer checkpoint
(lbsgd_cli/quantized_checkpoint.py) read back by ``lbsgd eval``, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from lbsgd_cli.errors import UserError
from lbsgd_cli.quantize import QTensor
from lbsgd_cli.restore import model_from_checkpoint

from .conftest import lbsgd, run_cli


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
        model, cfg = model_from_checkpoint(path)  # as lbsgd eval reads it
        params = dict(model.named_parameters())
        for key, d in raw["qweights"].items():
            assert d["data"].dtype == torch.int8 and d["zero_point"].dtype == torch.int32
            assert torch.equal(params[key].detach(), QTensor.from_dict(d).dequantize())
        assert bool(raw["activations"]) == name.endswith("_a8.pt")
        x = torch.randn(2, 1, 8, 8)
        model2, _ = model_from_checkpoint(path)
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
