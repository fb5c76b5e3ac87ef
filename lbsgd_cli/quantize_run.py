"""``lbsgd quantize``: quantize a trained network to b bits and measure it against fp32.

For every combination of ``quant.bits x granularity x symmetric x method x activations``
(each one value or a list) the weights of all conv and linear layers become b-bit
integers (:mod:`lbsgd_cli.quantize`, seminar "Quantization"), the activations optionally
too (calibrated on ``quant.calib_batches`` training batches), and the val top-1 error is
measured against the fp32 network. Each combination is written as an integer checkpoint
(``lbsgd-quantized-v1``, :mod:`lbsgd_cli.quantized_checkpoint`, readable by ``lbsgd eval``); ``quantize.json`` holds the figures
and, for several combinations, ``quantize_table.{csv,md}`` the table. With
``quant.int8_backend=true`` the network also runs on real int8 kernels
(:mod:`lbsgd_cli.int8`) and its latency is timed against fp32 at ``quant.latency_batch``.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint import FORMAT as TRAIN_FORMAT
from .config import as_list, normalise_quantize
from .data import DataSource, load_data, val_batches
from .distributed import pick_device
from .engine import evaluate
from .errors import UserError
from .quantize import attach_activation_quant, calibrate_activations, load_dequantized, quantize_weights
from .quantized_checkpoint import save_quantized, state_bytes
from .restore import check_classes, model_from_checkpoint
from .validation import check_data_root, validate_quantize

TABLE_COLUMNS = ["bits", "granularity", "symmetric", "method", "activations", "act_bits", "fp32_top1_err",
                 "quant_top1_err", "delta", "fp32_bytes", "quant_bytes", "compression", "path"]


def combinations(q: DictConfig) -> list[dict[str, Any]]:
    """One dict per combination of the list-valued keys, in the order given."""
    keys = ("bits", "granularity", "symmetric", "method", "activations")
    rows = [dict(zip(keys, values)) for values in itertools.product(*(as_list(q[k]) for k in keys))]
    for r in rows:
        r["act_bits"] = (q.act_bits or r["bits"]) if r["activations"] else None
    return rows


def tag(c: dict[str, Any]) -> str:
    sym = "sym" if c["symmetric"] else "asym"
    act = f"_a{c['act_bits']}" if c["activations"] else ""
    return f"w{c['bits']}_{c['granularity']}_{sym}_{c['method']}{act}"


def calibration_batches(data: DataSource, count: int, batch_size: int, seed: int,
                        device: torch.device) -> list[torch.Tensor]:
    """``count`` batches of training images, chosen at random by ``seed``, with val preprocessing."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(data.train_size, generator=g)[: count * batch_size]
    return [data.train_images(idx[i : i + batch_size], device) for i in range(0, len(idx), batch_size)]


def load_source(cfg: DictConfig, device: torch.device) -> tuple[torch.nn.Module, DictConfig, DataSource, dict[str, Any]]:
    """The fp32 network of ``cfg.checkpoint`` (plain BN), its training config, the data set it was trained on
    (in ``cfg.data_root`` if given), and where it came from (path, iteration, epoch)."""
    path = str(Path(cfg.checkpoint).expanduser())
    model, train_cfg = model_from_checkpoint(path, device, ghost_bn=False, quantized=False)
    if cfg.data_root:
        check_data_root(train_cfg.data.name, cfg.data_root, key="data_root")  # a digits checkpoint has no folder
        train_cfg.data.root = cfg.data_root
    data = load_data(train_cfg.data)
    check_classes(model, data.num_classes, train_cfg)
    info = model.checkpoint_info
    source = {"path": path, "iteration": info["iteration"], "epoch": info["epoch"]}
    return model, train_cfg, data, source


def quantize_command(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    validate_quantize(cfg)
    normalise_quantize(cfg)  # quant.symmetric / quant.activations as bools
    t_start = time.monotonic()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(run_dir)
    if (run_dir / "quantize.json").exists():
        raise UserError(f"run directory {run_dir} already holds quantize.json; choose another hydra.run.dir")
    device = pick_device(cfg.device, 0)
    model, train_cfg, data, source = load_source(cfg, device)
    if cfg.val_subset:
        data.subset_val(cfg.val_subset)  # the same images for every row
    combos = combinations(cfg.quant)
    print(f"lbsgd quantize: {train_cfg.model.arch} from {cfg.checkpoint}, {len(combos)} setting(s), "
          f"{data.val_size} val images\nrun dir: {run_dir}", flush=True)

    fp32 = evaluate(model, val_batches(data, 0, 1, cfg.eval_batch, device))
    fp32_err = fp32["top1_err"]
    state = model.state_dict()
    fp32_bytes = state_bytes({k: v for k, v in state.items() if v.is_floating_point()})
    print(f"fp32: top-1 error {fp32_err * 100:.2f}%, {fp32_bytes / 1e6:.3f} MB", flush=True)
    needs_calib = any(c["activations"] for c in combos) or cfg.quant.int8_backend
    calib = calibration_batches(data, cfg.quant.calib_batches, cfg.quant.calib_batch_size, cfg.seed, device) \
        if needs_calib else []

    run_dir.mkdir(parents=True, exist_ok=True)
    config_dict = OmegaConf.to_container(train_cfg, resolve=True, enum_to_str=True)
    rows = []
    for c in combos:
        qmodel = copy.deepcopy(model)
        qweights = quantize_weights(qmodel, c["bits"], c["granularity"] == "per_channel", c["symmetric"],
                                    c["method"], cfg.quant.percentile)
        load_dequantized(qmodel, qweights)
        acts = None
        if c["activations"]:  # ranges of the inputs the quantized-weight network actually sees
            acts = calibrate_activations(qmodel, calib, c["act_bits"], c["method"], cfg.quant.percentile)
            attach_activation_quant(qmodel, acts)
        res = evaluate(qmodel, val_batches(data, 0, 1, cfg.eval_batch, device))
        path = run_dir / ("quantized.pt" if len(combos) == 1 else f"quantized/{tag(c)}.pt")
        if path.exists():
            raise UserError(f"{path} already exists; choose another hydra.run.dir")
        quant_info = {**c, "percentile": cfg.quant.percentile, "calib_batches": cfg.quant.calib_batches}
        nbytes = save_quantized(path, qmodel, qweights, acts, config=config_dict, quant=quant_info,
                                num_classes=data.num_classes, in_channels=data.in_channels, source=source)
        row = {**c, "fp32_top1_err": fp32_err, "quant_top1_err": res["top1_err"],
               "delta": res["top1_err"] - fp32_err, "fp32_bytes": fp32_bytes, "quant_bytes": nbytes,
               "compression": round(fp32_bytes / nbytes, 2), "path": str(path)}
        rows.append(row)
        print(f"{tag(c)}: top-1 error {row['quant_top1_err'] * 100:.2f}% (delta {row['delta'] * 100:+.2f} "
              f"points), {nbytes / 1e6:.3f} MB", flush=True)

    extra: dict[str, Any] = {"checkpoint": str(cfg.checkpoint), "val_images": data.val_size,
                             "source_format": TRAIN_FORMAT}
    if cfg.quant.int8_backend:
        extra["int8_backend"] = int8_backend(model, data, calib, cfg, device)
    extra["wall_time_s"] = round(time.monotonic() - t_start, 1)
    result = {**rows[0], **extra} if len(rows) == 1 else {"fp32_top1_err": fp32_err, "fp32_bytes": fp32_bytes,
                                                          **extra, "rows": rows}
    (run_dir / "quantize.json").write_text(json.dumps(result, indent=2) + "\n")
    if len(rows) > 1:
        write_table(rows, run_dir)
    print_table(rows)
    return result


def int8_backend(model, data, calib: list[torch.Tensor], cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """Real int8 inference (torchao pt2e + inductor): val error and latency vs fp32, in one process."""
    from .int8 import compile_cpu, fixed_batch_eval, interleaved_latency, plain_batchnorm, quantize_pt2e_int8

    if device.type != "cpu":
        raise UserError("quant.int8_backend: the x86 integer kernels run on the CPU; use device=cpu")
    b = cfg.quant.latency_batch
    x = torch.cat(calib)[:b] if calib else None
    if x is None or x.shape[0] < b:
        raise UserError(f"quant.int8_backend: needs at least {b} calibration images (quant.calib_batches)")
    t = time.monotonic()
    int8 = compile_cpu(quantize_pt2e_int8(model, x, calib))
    fp32 = plain_batchnorm(copy.deepcopy(model)).eval()
    fp32_compiled = compile_cpu(copy.deepcopy(fp32))
    with torch.no_grad():
        int8(x), fp32_compiled(x)  # compile both before timing
    compile_s = time.monotonic() - t
    lat = interleaved_latency({"fp32_eager": fp32, "fp32_inductor": fp32_compiled, "int8_inductor": int8}, x,
                              reps=cfg.quant.latency_reps)
    err = fixed_batch_eval(int8, val_batches(data, 0, 1, cfg.eval_batch, device), b)
    out = {
        "recipe": "torchao X86InductorQuantizer default (int8 sym per-channel weights, uint8 per-tensor acts)",
        "int8_top1_err": err,
        "batch": b,
        "threads": torch.get_num_threads(),
        "reps": cfg.quant.latency_reps,
        "compile_s": round(compile_s, 1),
        **{f"latency_{k}_ms": round(v * 1e3, 3) for k, v in lat.items()},
        "speedup_vs_fp32_inductor": round(lat["fp32_inductor"] / lat["int8_inductor"], 3),
        "speedup_vs_fp32_eager": round(lat["fp32_eager"] / lat["int8_inductor"], 3),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    print(f"int8 kernels: top-1 error {err * 100:.2f}%, latency at batch {b}: int8 {out['latency_int8_inductor_ms']}"
          f" ms vs fp32 {out['latency_fp32_inductor_ms']} ms compiled / {out['latency_fp32_eager_ms']} ms eager "
          f"({out['speedup_vs_fp32_inductor']}x / {out['speedup_vs_fp32_eager']}x)", flush=True)
    return out


def _cells(r: dict[str, Any]) -> list[str]:
    return [str(r["bits"]), r["granularity"], "sym" if r["symmetric"] else "asym", r["method"],
            f"a{r['act_bits']}" if r["activations"] else "-", f"{r['fp32_top1_err'] * 100:.2f}",
            f"{r['quant_top1_err'] * 100:.2f}", f"{r['delta'] * 100:+.2f}", f"{r['quant_bytes'] / 1e3:.1f}",
            f"{r['compression']:.1f}x"]


_HEAD = ["bits", "granularity", "range", "method", "activations", "fp32 err %", "quant err %", "delta (points)",
         "size kB", "compression"]


def write_table(rows: list[dict[str, Any]], run_dir: Path) -> None:
    with open(run_dir / "quantize_table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(_HEAD) + " |", "|" + "---|" * len(_HEAD)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    (run_dir / "quantize_table.md").write_text("\n".join(lines) + "\n")


def print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="b-bit quantization vs fp32 (val top-1 error)")
    for h in _HEAD:
        table.add_column(h, justify="right" if h not in ("granularity", "method", "range") else "left")
    for r in rows:
        table.add_row(*_cells(r))
    Console(width=None if sys.stdout.isatty() else 160).print(table)
