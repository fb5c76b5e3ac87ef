#!/usr/bin/env python
"""The plan's cost model against the local multi-node cluster (issue 35 item 4).

    python scripts/experiments/check_plan_local.py [--csv results/multinode/steps.csv] [--out results/multinode/plan_check.csv]

Reads the measured steps (columns ``arch,depth,world,rate_gbit,delay_ms,comm_hook,step_s,step_s_w1,grad_bytes,
allreduce_s,exposed_s``: gloo over veth links shaped with ``tc``, one rank per namespace) and predicts each
step with :func:`lbsgd_cli.plan.predict_step` from the one-process step ``step_s_w1`` (compute), the bytes
allreduced (``grad_bytes``, as sent under ``comm_hook``), the world size, one rank per node, the link's rate
and added one-way delay, gloo's ring and DDP's 25 MiB buckets overlapped with backward. Nothing is fitted.
Prints and writes predicted against measured step, allreduce and exposed time with their relative errors.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from lbsgd_cli.plan import predict_step, ring_time

COLUMNS = ["arch", "depth", "world", "rate_gbit", "delay_ms", "comm_hook", "step_s", "step_s_w1", "grad_bytes",
           "allreduce_s", "exposed_s"]


def _rel(pred: float, meas: float) -> float | str:
    return pred / meas - 1 if meas else ""


def check(rows: list[dict]) -> list[dict]:
    """One output row per measured row of W > 1 on a shaped link (an unshaped veth has no rate to give the model):
    the prediction and its relative errors. The compute input is the step measured on this machine: with a
    ``compute_s`` column (forward and backward at the same W, no allreduce; 3 ranks share 2 cores, so W = 3
    computes slower than W = 1) plus the one-process step's remainder (optimizer), else ``step_s_w1``."""
    out = []
    w1 = {(r["arch"], r["depth"]): r for r in rows if r.get("world") == "1" and r.get("compute_s") not in (None, "")}
    for i, r in enumerate(rows, start=2):
        if r.get("world") == "1" or r.get("rate_gbit") in (None, ""):
            continue
        try:
            world, rate, delay = int(r["world"]), float(r["rate_gbit"]), float(r["delay_ms"])
            step, step1, nbytes = float(r["step_s"]), float(r["step_s_w1"]), float(r["grad_bytes"])
            ar = float(r["allreduce_s"]) if r.get("allreduce_s") not in (None, "") else float("nan")
            exposed = float(r["exposed_s"]) if r.get("exposed_s") not in (None, "") else float("nan")
        except (KeyError, TypeError, ValueError) as exc:
            raise SystemExit(f"check_plan_local: line {i}: bad value ({exc})") from None
        base = w1.get((r["arch"], r["depth"]))
        if r.get("compute_s") not in (None, "") and base is not None:
            step1 = float(r["compute_s"]) + float(base["step_s"]) - float(base["compute_s"])
        cost = predict_step(step1, nbytes, world, 1, bandwidth_gbit=rate, latency_ms=delay, algorithm="ring",
                            comm_hook=r.get("comm_hook") or "none")
        one = ring_time(nbytes, world, rate * 1e9 / 8, delay * 1e-3)  # the standalone allreduce, one buffer
        out.append({"arch": r["arch"], "depth": r["depth"], "world": world, "rate_gbit": rate, "delay_ms": delay,
                    "comm_hook": r.get("comm_hook") or "none", "step_s": step, "pred_step_s": cost.iter_s,
                    "step_err": _rel(cost.iter_s, step), "allreduce_s": ar, "pred_allreduce_s": one,
                    "allreduce_err": _rel(one, ar) if ar == ar else "", "exposed_s": exposed,
                    "pred_exposed_s": cost.exposed_s})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=Path("results/multinode/steps.csv"))
    ap.add_argument("--out", type=Path, default=None, help="write the comparison here (default: beside --csv, "
                    "plan_check.csv)")
    a = ap.parse_args(argv)
    if not a.csv.is_file():
        print(f"check_plan_local: error: {a.csv} does not exist (the local cluster's measurements: "
              "results/multinode/steps.csv)", file=sys.stderr)
        return 2
    with open(a.csv, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            print(f"check_plan_local: error: {a.csv} lacks the columns {', '.join(missing)}", file=sys.stderr)
            return 2
        try:
            out = check(list(reader))
        except SystemExit as exc:
            print(f"{exc}", file=sys.stderr)
            return 2
    dest = a.out or a.csv.with_name("plan_check.csv")
    with open(dest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out[0]) if out else ["arch"])
        w.writeheader()
        for r in out:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    print(f"{'model':<14}{'W':>3}{'Gbit/s':>8}{'delay ms':>9}{'hook':>6}{'step ms':>9}{'pred ms':>9}{'err':>8}"
          f"{'allreduce ms':>13}{'pred':>8}{'err':>8}")
    for r in out:
        fmt = lambda e: f"{e:+.0%}" if isinstance(e, float) else "-"  # noqa: E731
        print(f"{r['arch'] + '-' + str(r['depth']):<14}{r['world']:>3}{r['rate_gbit']:>8g}{r['delay_ms']:>9g}"
              f"{r['comm_hook']:>6}{r['step_s'] * 1e3:>9.1f}{r['pred_step_s'] * 1e3:>9.1f}{fmt(r['step_err']):>8}"
              f"{r['allreduce_s'] * 1e3:>13.1f}{r['pred_allreduce_s'] * 1e3:>8.1f}{fmt(r['allreduce_err']):>8}")
    errs = [abs(r["step_err"]) for r in out if isinstance(r["step_err"], float)]
    if errs:
        print(f"{len(errs)} rows; step time: median |error| {sorted(errs)[len(errs) // 2]:.0%}, largest {max(errs):.0%}")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
