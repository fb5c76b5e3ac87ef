#!/usr/bin/env python
"""results/gpu.md from what a device call of ``scripts/gpu/gpu_session.sh`` brought back (issue 28).

    python scripts/gpu/gpu_report.py DIR [DIR...] --out results/gpu.md

Each DIR holds some of: device.txt, cuda_report.jsonl, bench_gpu.json, bench_gpu.md, bench_memory.json (a later
DIR's file replaces an earlier one's). The report states the device, driver, torch and CUDA versions, the
commands, and checks issue 28's goals against the figures:

- end to end in bf16: at least 3,000 img/s (anchor: NVIDIA's ResNet-50 with DALI and AMP, 2,470 img/s on one
  A100, DeepLearningExamples' published training throughput);
- ghost BN within 10 % of plain BN: each step row's ms per step over its plain-BN twin's, at most 1.10;
- the loader at least 1.3x the step: each decode mode's img/s over the fastest bf16 ghost-BN step's.

A section whose file is absent says so; nothing is filled in that was not measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench_memory

ANCHOR = ("NVIDIA DeepLearningExamples, ResNet-50 v1.5 (PyTorch, DALI, AMP), one A100 80GB: 2,470 img/s "
          "training throughput at batch 256")
E2E_GOAL, GHOST_GOAL, LOADER_GOAL = 3000.0, 1.10, 1.3
COMMANDS = """```bash
bash scripts/gpu/gpu_session.sh device correctness bench memory   # on the GPU machine; what each part runs:
python -m pytest -q tests/test_cuda.py                        # correctness (LBSGD_CUDA_REPORT=cuda_report.jsonl)
python scripts/bench/bench_gpu.py --out bench_gpu                   # the ImageNet path
python scripts/bench/bench_memory.py --out DIR                      # the memory table
python scripts/gpu/gpu_report.py DIR --out results/gpu.md         # this file
```"""


def collect(dirs: list[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in dirs:
        for name in ("device.txt", "cuda_report.jsonl", "bench_gpu.json", "bench_gpu.md", "bench_memory.json"):
            if (d / name).is_file():
                found[name] = d / name
    return found


def goals(bench: dict) -> list[str]:
    """Issue 28's three goals, each as a line with the figures it is decided on."""
    lines = []
    e2e = {k: v["img_per_s"] for k, v in bench.get("end_to_end", {}).items() if "bf16" in k and "img_per_s" in v}
    if e2e:
        best = max(e2e, key=e2e.get)
        lines.append(f"- End to end, bf16: {e2e[best]:,.0f} img/s ({best}); goal >= {E2E_GOAL:,.0f}: "
                     f"{'met' if e2e[best] >= E2E_GOAL else 'not met'}.")
    step = {k: v for k, v in bench.get("step", {}).items() if "ms_per_step" in v}
    ratios = []
    for name, row in step.items():
        if "ghost BN" in name:
            twin = name.split(" ghost BN")[0] + " plain BN"
            if twin in step:
                ratios.append((row["ms_per_step"] / step[twin]["ms_per_step"], name.split(" ghost BN")[0]))
    if ratios:
        worst = max(ratios)
        listed = ", ".join(f"{s} {r:.2f}x" for r, s in ratios)
        lines.append(f"- Ghost BN over plain BN, ms per step: {listed}; goal <= {GHOST_GOAL:.2f}x everywhere: "
                     f"{'met' if worst[0] <= GHOST_GOAL else f'not met ({worst[1]})'}.")
    ghost_bf16 = [v["img_per_s"] for k, v in step.items() if k.startswith("bf16") and "ghost BN" in k]
    loader = {k: v["img_per_s"] for k, v in bench.get("loader", {}).items() if "img_per_s" in v}
    if ghost_bf16 and loader:
        fastest = max(ghost_bf16)
        listed = ", ".join(f"{k} {v / fastest:.2f}x" for k, v in loader.items())
        met = [k for k, v in loader.items() if v / fastest >= LOADER_GOAL]
        lines.append(f"- Loader over the fastest bf16 ghost-BN step ({fastest:,.0f} img/s): {listed}; goal >= "
                     f"{LOADER_GOAL}x: {'met by ' + ', '.join(met) if met else 'not met'}.")
    return lines


def correctness(lines: list[dict]) -> list[str]:
    out = ["| check | setting | measured | passes when |", "|---|---|---|---|"]
    for r in lines:
        if r["test"] == "resume":
            out.append(f"| killed and resumed vs uninterrupted | {r['mode']} | max weight diff "
                       f"{r['max_abs_weight_diff']:.3g} | {'0 (bit-exact)' if r['mode'] == 'bit-exact' else '<= 5e-2'} |")
        elif r["test"] == "no_sync":
            out.append(f"| `set_sync_debug_mode(\"error\")` around a step | {r['precision']} | no host sync | "
                       "no error raised |")
        elif r["test"] == "passes":
            out.append(f"| `batch.k` in 1, 2, 4 passes vs one | fp32 | max diff {r['max_abs_diff']:.3g} | <= 1e-5 |")
        elif r["test"] == "pytest":
            out.append(f"| pytest tests/test_cuda.py: the verdict of every assertion | - | {r['summary'] or '?'} "
                       f"(exit {r['rc']}) | exit 0 |")
        elif r["test"] == "peak_memory":
            out.append(f"| peak memory recorded by train / eval | fp32, bf16 eval | train "
                       f"{r['train_peak_allocated_mb']} MiB, eval {r['eval_peak_mb']} | > 0, bf16 < fp32 |")
    return out


def report(found: dict[str, Path]) -> str:
    parts = ["# lbsgd on one GPU (issue 28)", ""]
    if "device.txt" in found:
        parts += ["Device (nvidia-smi; torch and its CUDA):", "", "```", found["device.txt"].read_text().strip(),
                  "```", ""]
    else:
        parts += ["Device: not recorded (no device.txt).", ""]
    parts += ["Commands:", "", COMMANDS, ""]
    parts += ["## 1. The ImageNet path (`scripts/bench/bench_gpu.py`)", ""]
    if "bench_gpu.json" in found:
        bench = json.loads(found["bench_gpu.json"].read_text())
        if "bench_gpu.md" in found:
            parts += [found["bench_gpu.md"].read_text().strip(), ""]
        parts += [f"Published anchor: {ANCHOR}.", "", *goals(bench), ""]
    else:
        parts += ["Not measured yet.", ""]
    parts += ["## 2. The seminar's memory table (`scripts/bench/bench_memory.py`)", ""]
    if "bench_memory.json" in found:
        from bench_memory import table

        mem = json.loads(found["bench_memory.json"].read_text())
        parts += [f"{mem['device']}, torch {mem['torch']}.", "", table(mem["rows"]).strip(), ""]
    else:
        parts += ["Not measured yet.", ""]
    parts += ["## 3. Correctness on CUDA (`tests/test_cuda.py`)", ""]
    if "cuda_report.jsonl" in found:
        rows = [json.loads(x) for x in found["cuda_report.jsonl"].read_text().splitlines() if x.strip()]
        parts += [f"Device: {rows[0].get('device', '?') if rows else '?'}. Each test writes its row before its "
                  "assertion; pytest's verdict (the last row) says whether all held.", "", *correctness(rows), ""]
    else:
        parts += ["Not measured yet.", ""]
    return "\n".join(parts)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    text = report(collect(a.dirs))
    a.out.write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
