"""Peak accelerator memory and time per batch of ResNet-50 under each memory mode, beside ``none``.

Evaluation: ``offload.mode`` none | sequential | model (lbsgd_cli/offload.py, accelerate hooks).
``model`` is timed as forward + release per batch, the case where another model (say the
quantized one) takes the accelerator between batches; a model that stays in use pays the
transfer once. Training: plain vs ``memory.checkpointing`` (one checkpoint per ResNet stage).
Ratios to ``none`` are taken in this one run. The PCIe lines bound what offloading must cost:
every forward under ``sequential`` copies all weights host -> device.

    python scripts/bench/bench_offload.py                                   # GPU: the full table
    python scripts/bench/bench_offload.py --device cpu --reps 1 --out results/offload.md   # mechanics only

On CPU the "accelerator" is the CPU itself: times show the hooks' overhead, not transfers,
and there is no accelerator memory to measure.

FSDP2 (``memory.fsdp``, ``memory.fsdp_cpu_offload``) shards over >= 2 processes, so it has no row
in this one-process table. Measure it with the CLI, the same command with and without the keys:

    torchrun --nproc_per_node=2 -m lbsgd_cli train model.arch=resnet50 data.name=... schedule.epochs=1 \\
        memory.fsdp=true memory.fsdp_cpu_offload=true
    nvidia-smi --query-gpu=index,memory.used --format=csv -l 1     # peak memory per GPU, alongside

and compare ``images_per_sec`` in each run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lbsgd_cli.config import ModelConfig  # noqa: E402
from lbsgd_cli.ghost_bn import deferred_running_stats, flush_running_stats  # noqa: E402
from lbsgd_cli.metrics import peak_memory_mb, reset_peak_memory  # noqa: E402
from lbsgd_cli.models import build_model  # noqa: E402
from lbsgd_cli.offload import place, remove  # noqa: E402
from lbsgd_cli.stage_checkpointing import enable_stage_checkpointing  # noqa: E402

PCIE_GBPS = {"PCIe 4.0 x16": 25.0, "PCIe 5.0 x16": 50.0}  # usable host->device bandwidth, GB/s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the previous mode's cached blocks do not count against this one
    reset_peak_memory(device)


def peak_mb(device: torch.device) -> float | None:
    return peak_memory_mb(device).get("allocated")  # None off CUDA: no accelerator memory to measure


def resnet50(batch: int) -> torch.nn.Module:
    cfg = OmegaConf.structured(ModelConfig)
    cfg.arch = "resnet50"
    torch.manual_seed(0)
    return build_model(cfg, 1000, 3, bn_group=batch)  # ghost BN over the whole batch: one worker


def time_eval(model: torch.nn.Module, mode: str, device: torch.device, batch: int, reps: int) -> tuple[float, float]:
    model = copy.deepcopy(model).eval()
    x = torch.randn(batch, 3, 224, 224, device=device)
    reset_peak(device)
    placed = place(model, mode, device)
    times = []
    with torch.no_grad():
        for _ in range(reps + 1):  # the first pass warms up (allocator, kernels)
            sync(device)
            t = time.perf_counter()
            placed.model(x)
            placed.release()  # no-op for none/sequential; model: back to the CPU, as when models alternate
            sync(device)
            times.append(time.perf_counter() - t)
    mem = peak_mb(device)
    if mode == "sequential":
        remove(placed.model)
    return statistics.median(times[1:]), mem


def time_train(model: torch.nn.Module, mode: str, device: torch.device, batch: int, reps: int) -> tuple[float, float]:
    model = copy.deepcopy(model).to(device).train()
    if mode == "checkpointing":
        enable_stage_checkpointing(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    reset_peak(device)
    times = []
    for _ in range(reps + 1):
        sync(device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with deferred_running_stats(model) as bns:
            F.cross_entropy(model(x), y).backward()
        opt.step()
        flush_running_stats(bns)
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]), peak_mb(device)


def pcie_lines(model: torch.nn.Module, batches: list[int], eval_ms: dict[int, float], gpu: bool) -> list[str]:
    params = sum(p.numel() for p in model.parameters())
    mb = params * 4 / 1e6
    lines = [f"ResNet-50: {params / 1e6:.1f}M parameters x 4 B = {mb:.0f} MB copied host -> device per forward "
             "under `sequential` (and once per use under `model`)."]
    for name, gbps in PCIE_GBPS.items():
        ms = mb / 1e3 / gbps * 1e3
        per = ", ".join(f"{ms / b * 1e3:.0f} us/image at batch {b}" for b in batches)
        lines.append(f"- {name} (~{gbps:.0f} GB/s): >= {ms:.1f} ms per forward ({per}).")
    if gpu:
        for b in batches:
            lines.append(f"- batch {b}: measured `none` forward {eval_ms[b]:.1f} ms, so the transfer alone adds "
                         f">= {mb / 1e3 / PCIE_GBPS['PCIe 4.0 x16'] * 1e3 / eval_ms[b] * 100:.0f}% on PCIe 4.0.")
    lines.append("Pageable (unpinned) host memory, which accelerate's weight map is, typically reaches half of "
                 "these rates, so measured overheads sit above the bound.")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="32,64,128", help="comma-separated batch sizes")
    ap.add_argument("--reps", type=int, default=5, help="timed passes per cell (after one warm-up pass)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batches = [int(b) for b in args.batches.split(",")]
    eval_modes, train_modes = ["none", "sequential", "model"], ["none", "checkpointing"]

    header = ["| pass | batch | mode | peak accelerator MB | x none | ms / batch | x none |",
              "|---|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    rows, eval_ms = [], {}
    for b in batches:
        base = resnet50(b)
        ref_t = ref_m = None
        for kind, modes, fn in (("eval", eval_modes, time_eval), ("train", train_modes, time_train)):
            for mode in modes:
                t, mem = fn(base, mode, device, b, args.reps)
                if mode == "none":
                    ref_t, ref_m = t, mem
                    if kind == "eval":
                        eval_ms[b] = t * 1e3
                mem_s = f"{mem:.0f}" if mem is not None else "n/a (CPU)"
                ratio_m = f"{mem / ref_m:.2f}" if mem is not None and ref_m else "n/a"
                rows.append(f"| {kind} | {b} | {mode} | {mem_s} | {ratio_m} | {t * 1e3:.0f} | {t / ref_t:.2f} |")
                print(rows[-1], flush=True)

    dev_name = torch.cuda.get_device_name(device) if gpu else "CPU (execution device = offload device = CPU)"
    text = [f"device: {dev_name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"median of {args.reps} timed pass(es) after one warm-up", "", *header, *rows, "",
            *pcie_lines(resnet50(batches[0]), batches, eval_ms, gpu)]
    print("\n".join(text[len(rows) + 5 :]))
    if args.out:
        cmd = "python " + " ".join(["scripts/bench/bench_offload.py", *sys.argv[1:]])
        note = ("" if gpu else "\n**Memory figures need a GPU.** This run used the CPU as both the offload and "
                "the execution device: the times show the mechanics (accelerate's hooks, activation "
                "recomputation), not PCIe transfers, and there is no accelerator memory to measure.\n")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Offloading and activation checkpointing: ResNet-50\n\nCommand: `{cmd}`\n{note}\n"
                            + "\n".join(text) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
