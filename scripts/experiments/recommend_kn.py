#!/usr/bin/env python
"""Recommend the largest useful minibatch ``kn`` from a run's measured gradient noise scale.

    python scripts/experiments/recommend_kn.py RUN_DIR [--after-epoch E] [--before-epoch B] [--by-epoch]

RUN_DIR is a directory of ``lbsgd train ... log.noise_scale=true`` (its ``metrics.jsonl`` and
``config.yaml``). The script takes the median ``train/noise_scale`` (``B_simple``) of the
per-iteration records from ``--after-epoch`` (default: the end of a real warmup, i.e. one whose
peak is above its start, else epoch 1: the first iterations, where the gradient is large, give
small values that do not represent the run) up to ``--before-epoch`` (default: the end of the run).
``--before-epoch 5`` predicts from the first epochs of a run alone, before the ladder is trained.
``--by-epoch`` also prints the median of every epoch: how the noise scale grows as the loss falls.

Why that number: McCandlish et al. 2018 (§2.2) show that a step on a minibatch of ``B`` makes
``1/(1 + B_noise/B)`` of the progress of a full-batch step, ``B_noise ~ B_simple``. Below
``B_simple`` doubling the minibatch nearly halves the steps needed (the regime where Goyal et
al.'s linear scaling rule holds); at ``B = B_simple`` a step has half the full-batch benefit,
and beyond it each doubling buys less and less. So ``B_simple`` is the largest ``kn`` worth its
compute; the script prints the power of two nearest to it (in log scale), as minibatches are
chosen in powers of two. The noise scale grows as training proceeds, so measure late enough.

A record whose ``|G|^2`` estimate is not positive (logged as ``null``: the gradient's mean is lost in
its noise at these two batch sizes, which happens late in training, after the rate drops) counts as an
infinite ``B_simple``, not as a missing one: leaving such records out would bias the median low exactly
where the noise scale is largest. Where they are more than half, the median is infinite and no ``kn``
is recommended: measure with larger batches (``batch.workers_per_pass``, ``k``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import yaml


def nearest_power_of_two(x: float) -> int:
    """``2**round(log2(x))``: 2**k nearest to ``x`` on a log scale (at least 1)."""
    return 2 ** max(0, round(math.log2(x)))


def noise_scales(records: list[dict], after_epoch: float, before_epoch: float = math.inf) -> list[float]:
    """The ``train/noise_scale`` values of records with ``after_epoch <= epoch < before_epoch``: positive ones,
    and ``inf`` for a ``null`` one (the ``|G|^2`` estimate not positive); a negative one (a negative
    ``tr(Sigma)`` estimate) says nothing and is left out."""
    out = []
    for r in records:
        if "train/noise_scale" not in r or not after_epoch <= r.get("epoch", 0) < before_epoch:
            continue
        b = r["train/noise_scale"]
        if b is None:
            out.append(math.inf)
        elif isinstance(b, int | float) and b > 0:
            out.append(float(b))
    return out


def by_epoch(records: list[dict]) -> dict[int, tuple[float, int, int]]:
    """Epoch -> (median ``B_simple``, records, of them unresolved: ``inf``) of each epoch's records."""
    out: dict[int, list[float]] = {}
    for r in records:
        for b in noise_scales([r], 0):
            out.setdefault(int(r.get("epoch", 0)), []).append(b)
    return {e: (statistics.median(v), len(v), sum(math.isinf(b) for b in v)) for e, v in sorted(out.items())}


def warmup_end(cfg: dict) -> float:
    """The epoch where the run's warmup ends; 1 where it has none, or a flat one (``kn <= optim.ref_batch``
    under the linear rule: warmup starts at the peak), so that the first epoch is still left out."""
    sched, batch, optim = cfg.get("schedule", {}), cfg.get("batch", {}), cfg.get("optim", {})
    flat = batch.get("k", 0) * batch.get("n", 0) <= optim.get("ref_batch", 0)
    if sched.get("warmup", "gradual") == "none" or flat:
        return 1.0
    return float(sched.get("warmup_epochs", 0))


def recommend(run_dir: Path, after_epoch: float | None = None, before_epoch: float = math.inf) -> dict:
    """Median ``B_simple`` between the two epochs and the recommended ``kn`` for the run in ``run_dir``."""
    cfg_path = run_dir / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
    if after_epoch is None:
        after_epoch = warmup_end(cfg)
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    values = noise_scales(records, after_epoch, before_epoch)
    if not values:
        raise SystemExit(f"recommend_kn: {run_dir / 'metrics.jsonl'} has no train/noise_scale in epochs "
                         f"[{after_epoch:g}, {before_epoch:g}) (train with log.noise_scale=true, long enough)")
    b = statistics.median(values)
    unresolved = sum(math.isinf(v) for v in values)
    batch = cfg.get("batch", {})
    kn = batch.get("k", 0) * batch.get("n", 0) or None
    return {"b_simple": b, "records": len(values), "unresolved": unresolved, "after_epoch": after_epoch,
            "before_epoch": before_epoch, "kn": kn,
            "recommended_kn": nearest_power_of_two(b) if math.isfinite(b) else None, "by_epoch": by_epoch(records)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--after-epoch", type=float, default=None, help="ignore records before this epoch "
                    "(default: the end of the run's warmup, or 1 where it has none)")
    ap.add_argument("--before-epoch", type=float, default=math.inf, help="ignore records from this epoch on "
                    "(e.g. 5: a prediction from the first 5 epochs alone)")
    ap.add_argument("--by-epoch", action="store_true", help="also print each epoch's median B_simple")
    args = ap.parse_args(argv)
    r = recommend(args.run_dir, args.after_epoch, args.before_epoch)
    if args.by_epoch:
        print("epoch  median B_simple  records  unresolved (|G|^2 estimate <= 0: inf)")
        for e, (b, n, inf) in r["by_epoch"].items():
            print(f"{e:5d}  {b:15.1f}  {n:7d}  {inf:10d}")
    window = f"epochs [{r['after_epoch']:g}, {r['before_epoch']:g})"
    print(f"median B_simple = {r['b_simple']:.1f} over {r['records']} records in {window}, {r['unresolved']} of them "
          "unresolved (inf)" + (f" (this run: kn = {r['kn']})" if r["kn"] else ""))
    if r["recommended_kn"] is None:
        print("no recommendation: the |G|^2 estimate is not positive in half the records or more (the gradient's mean "
              "is lost in its noise at these batch sizes); measure with larger ones (batch.workers_per_pass, k)")
    else:
        print(f"recommended largest kn: {r['recommended_kn']}")


if __name__ == "__main__":
    main()
