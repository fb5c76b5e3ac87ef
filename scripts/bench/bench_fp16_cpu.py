"""fp16 autocast against fp32 and bf16 on a CPU: one epoch of the digits preset on one thread (``experiment=debug``), one
``lbsgd train`` per precision in this one process, alternated over rounds so that load from other processes on
the machine falls on each alike; prints each run's images/s (summary.json) and the medians' ratios.

    python scripts/bench/bench_fp16_cpu.py [ROUNDS] [OUT_DIR]

The figure behind the fp16-on-CPU warning of ``lbsgd train``'s header (lbsgd_cli/train.py, README)."""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

from lbsgd_cli import cli


def run(precision: str, out: Path) -> float:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main(["train", "experiment=debug", "schedule.epochs=1", f"precision={precision}", "log.tensorboard=false",
                         "log.progress=none", f"hydra.run.dir={out}"])
    assert code == 0, f"precision={precision} failed"
    return json.loads((out / "summary.json").read_text())["images_per_sec"]


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    base = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp(prefix="bench_fp16_"))
    speeds: dict[str, list[float]] = {"fp32": [], "bf16": [], "fp16": []}
    for r in range(rounds):
        for precision in speeds:
            speeds[precision].append(run(precision, base / f"{precision}-{r}"))
            print(f"round {r} {precision}: {speeds[precision][-1]:.0f} img/s", flush=True)
    med = {p: statistics.median(v) for p, v in speeds.items()}
    print(" ".join(f"{p} {v:.0f} img/s" for p, v in med.items())
          + f"; fp32/fp16 = {med['fp32'] / med['fp16']:.1f}x, fp32/bf16 = {med['fp32'] / med['bf16']:.2f}x")


if __name__ == "__main__":
    main()
