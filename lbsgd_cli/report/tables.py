"""Markdown tables of ``tables.md``: every setting, Table 1, Figure 1's ladder, Tables 2a/2b, the same runs
on two devices, Table 2b across networks, and the methods beyond the paper.

Errors are in percent, mean ± std over seeds of each run's median val error of the last 5 epochs (§5.1
footnote); a diverged run is shown as diverged, never as a number, and is left out of means.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from .runs import Run
from .studies import Methods, Study, comparable_ladders, finished, flat_edge, mean_val_err

def cell(runs: list[Run]) -> str:
    """``mean ± std`` in percent over the runs that did not diverge; ``diverged`` where one did."""
    vals = [r.row["val_err"] for r in runs if not r.diverged and r.row["val_err"] is not None]
    div = sum(r.diverged for r in runs)
    if not vals:
        return "diverged" if div else "-"
    text = f"{100 * vals[0]:.2f}" if len(vals) == 1 else (
        f"{100 * statistics.mean(vals):.2f} ± {100 * statistics.stdev(vals):.2f}")
    return text + (f" ({div} diverged)" if div else "")


def last(runs: list[Run]) -> str:
    """The last epoch's train and val error in percent, averaged over the runs that did not diverge."""
    ok = [r for r in runs if not r.diverged and r.epochs]
    if not ok:
        return "diverged" if runs else "-"
    train = statistics.mean(r.epochs[-1]["train/err"] for r in ok)
    val = statistics.mean(r.epochs[-1]["val/err"] for r in ok)
    return f"{100 * train:.2f} / {100 * val:.2f}"


def seeds(runs: list[Run]) -> str:
    return ",".join(str(s) for s in sorted({r.row["seed"] for r in runs}))


def gap(study: Study, runs: list[Run]) -> str:
    """The runs' mean val error minus the baseline's, in points (``-`` where either has no value)."""
    return points(runs, study.baseline())


def points(runs: list[Run], ref: list[Run]) -> str:
    """The runs' mean val error minus ``ref``'s, in points (``-`` where either has no value)."""
    a, b = mean_val_err(runs), mean_val_err(ref)
    return f"{100 * (a - b):+.2f}" if a is not None and b is not None else "-"


def comparison(studies: dict[str, Study]) -> list[str]:
    """Figure 1 of several studies side by side (e.g. one schedule at two lengths): does the flat region move?"""
    ladders = comparable_ladders(studies)
    if not ladders:
        return []
    out = ["## Figure 1 across studies: val error % (vs each study's baseline, points)", "",
           "| kn | " + " | ".join(ladders) + " |", "|---|" + "---|" * len(ladders)]
    for kn in sorted({kn for lad in ladders.values() for kn in lad}):
        cells = [f"{cell(lad[kn])} ({gap(studies[name], lad[kn])})" if kn in lad else "-"
                 for name, lad in ladders.items()]
        out.append(f"| {kn} | " + " | ".join(cells) + " |")
    return out + [""]


def device_pairs(runs: list[Run]) -> list[str]:
    """Markdown: each run (network, schedule, precision, setting and seed) done on more than one device, side by side.

    The same config and seed on a CPU and a GPU differ only in the order of floating-point sums, which
    training amplifies; the differences say how far a device moves a result, to set beside the seed spread.
    """
    keys = ("arch", "precision", "kn", "warmup", "rule", "base_lr", "zero_gamma", "seed", "epochs")
    groups: dict[tuple, dict[str, Run]] = defaultdict(dict)
    for r in runs:
        groups[(r.cfg["schedule"]["epochs"], *(r.row[k] for k in keys))][r.row["device"]] = r
    pairs = {key: by for key, by in sorted(groups.items()) if len(by) > 1}
    if not pairs:
        return []
    devices = sorted({d for by in pairs.values() for d in by}, key=lambda d: (d != "cpu", d))
    out = ["## The same runs on two devices: val error %", "",
           "| network | epochs | kn | warmup | rule | base lr | zero-gamma | seed | " + " | ".join(devices)
           + f" | {devices[-1]} - {devices[0]} (points) |", "|---" * (9 + len(devices)) + "|"]
    diffs = []
    for key, by in pairs.items():
        planned, arch, precision, kn, warmup, rule, base_lr, zg, seed, _ = key
        vals = [by[d].row["val_err"] if d in by and not by[d].diverged else None for d in devices]
        cells = ["diverged" if d in by and by[d].diverged else "-" if v is None else f"{100 * v:.2f}"
                 for d, v in zip(devices, vals)]
        diff = "-"
        if vals[0] is not None and vals[-1] is not None:
            diffs.append(100 * (vals[-1] - vals[0]))
            diff = f"{diffs[-1]:+.2f}"
        out.append(f"| {arch} {precision} | {planned} | {kn} | {warmup} | {rule} | {base_lr:g} | {zg} | {seed} | "
                   + " | ".join(cells) + f" | {diff} |")
    if diffs:
        out += ["", f"{len(diffs)} pairs: mean difference {statistics.mean(diffs):+.2f} points, mean absolute "
                f"{statistics.mean(abs(d) for d in diffs):.2f}, largest {max(diffs, key=abs):+.2f}"]
    return out + [""]


def zero_gamma_pairs(runs: list[Run]) -> list[str]:
    """Markdown: Table 2b (§5.1, zero-gamma on and off) of every network and schedule side by side.

    Each row is one network (depth and shortcut), schedule, precision and device at one kn and setting of the
    paper's SGD with step decay, run with zero-gamma on and off: the val error of each, zero-gamma's cost
    (on minus off, points) and the training error at the end (does zero-gamma cost optimisation or
    generalisation?). Runs not finished are left out. Empty unless two or more networks or schedules have a
    pair: one study's pairs are in its own Table 2b.
    """
    keys = ("arch", "planned_epochs", "precision", "device", "kn", "warmup", "warmup_epochs", "rule", "base_lr")
    groups: dict[tuple, dict[bool, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.row["optim"] == "sgd" and r.row["decay"] == "step" and finished(r):
            groups[tuple(r.row[k] for k in keys)][bool(r.row["zero_gamma"])].append(r)
    order = lambda kv: tuple(v if isinstance(v, (int, float)) else str(v) for v in kv[0])  # noqa: E731 (kn ascending)
    pairs = {key: by for key, by in sorted(groups.items(), key=order) if len(by) == 2}
    if len({key[:4] for key in pairs}) < 2:
        return []

    def train(rs: list[Run]) -> str:
        vals = [r.row["train_err"] for r in rs if not r.diverged and r.row["train_err"] is not None]
        return f"{100 * statistics.mean(vals):.2f}" if vals else "-"

    out = ["## Table 2b across networks: zero-gamma on and off (val error %; cost = on - off, points)", "",
           "| network | epochs | precision | device | kn | warmup | rule | base lr | zero-gamma on | off | cost "
           "| training error at the end, on / off | seeds on / off |", "|---" * 13 + "|"]
    for key, by in pairs.items():
        arch, planned, precision, device, kn, warmup, w_ep, rule, base_lr = key
        on, off = by[True], by[False]
        out.append(f"| {arch} | {planned} | {precision} | {device} | {kn} | {warmup_label(warmup, w_ep)} | {rule} "
                   f"| {base_lr:g} | {cell(on)} | {cell(off)} | {points(on, off)} | {train(on)} / {train(off)} "
                   f"| {seeds(on)} / {seeds(off)} |")
    return out + [""]


def tables(study: Study) -> list[str]:
    """Markdown: every setting, Table 1, the kn ladder (Fig. 1), Tables 2a and 2b."""
    out = ["All runs (val error %, median of the last 5 epochs; mean ± std over seeds)", "",
           "| kn | lr | warmup | rule | zero-gamma | epochs | steps | val error % | last epoch: train / val error % "
           "| seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in study.runs:
        x = r.row
        groups[(x["kn"], x["lr"], x["warmup"], x["rule"], str(x["zero_gamma"]), x["epochs"])].append(r)
    for (kn, lr, warmup, rule, zg, ep), rs in sorted(groups.items()):
        steps = max(r.row["steps"] for r in rs)
        out.append(f"| {kn} | {lr:.3g} | {warmup} | {rule} | {zg} | {ep} | {steps} | {cell(rs)} | {last(rs)} "
                   f"| {seeds(rs)} |")
    out += recipe_tables(study)
    for name, variant in study.variants.items():
        out += recipe_tables(variant, f" ({name})")
    out += setting_tables(study)
    return out


def recipe_tables(study: Study, recipe: str = "") -> list[str]:
    """Markdown: Table 1 and the kn ladder (Fig. 1) of the study's recipe, ``recipe`` naming a variant's."""
    out: list[str] = []
    base = study.baseline()
    if study.warmup_kns:
        out += ["", f"Table 1{recipe}: warmup at the large kn", "", "| setting | kn | lr | val error % | seeds |",
                "|---|---|---|---|---|"]
        out.append(f"| baseline | {study.base_kn} | {base[0].row['lr']:.3g} | {cell(base)} | {seeds(base)} |")
        for kn in study.warmup_kns:
            for mode in ("none", "constant", "gradual"):
                rs = study.recipe(kn=kn, warmup=mode)
                if rs:
                    out.append(f"| {mode} warmup | {kn} | {rs[0].row['lr']:.3g} | {cell(rs)} | {seeds(rs)} |")
    ladder = study.ladder()
    if len(ladder) > 1:
        out += ["", f"Figure 1{recipe}: val error against kn (gradual warmup)", "",
                "| kn | lr | steps | val error % | vs baseline (points) | seeds |", "|---|---|---|---|---|---|"]
        for kn, rs in ladder.items():
            steps = max(r.row["steps"] for r in rs)
            out.append(f"| {kn} | {rs[0].row['lr']:.3g} | {steps} | {cell(rs)} | {gap(study, rs)} | {seeds(rs)} |")
    return out


def setting_tables(study: Study) -> list[str]:
    """Markdown: Tables 2a (the rate rule, the base rate) and 2b (zero-gamma), at every kn that varies them."""
    out: list[str] = []
    for title, keys in (("Table 2a: the rate rule", ("rule", "base_lr")), ("Table 2b: zero-gamma", ("zero_gamma",))):
        others = {k: v for k, v in study.default.items() if k not in keys}

        def setting(values: dict[str, Any], keys: tuple[str, ...] = keys) -> tuple[str, ...]:
            return tuple(str(values[k]) for k in keys)

        recipe = setting(study.default)
        for kn in sorted({r.row["kn"] for r in study.runs}):
            rs = [r for r in study.select(kn=kn, **others)  # gradual warmup; at the baseline's kn it is flat
                  if r.row["warmup"] == "gradual" or kn == study.base_kn]
            values = sorted({setting(r.row) for r in rs})
            if len(values) > 1:
                head = "| rule | base lr (per ref. batch) |" if len(keys) > 1 else "| zero_gamma |"
                out += ["", f"{title} at kn = {kn}", "", f"{head} lr | val error % | vs baseline (points) | seeds |",
                        "|---" * (len(keys) + 4) + "|"]
                for v in values:
                    sub = [r for r in rs if setting(r.row) == v]
                    name = " | ".join(v) + (" (the recipe)" if v == recipe else "")
                    out.append(f"| {name} | {sub[0].row['lr']:.3g} | {cell(sub)} | {gap(study, sub)} | {seeds(sub)} |")
    return out


def warmup_label(warmup: str, epochs: float) -> str:
    """``gradual 15 ep``; ``none`` (no warmup has no length)."""
    return warmup if warmup == "none" else f"{warmup} {epochs:g} ep"


def setting_label(runs: list[Run]) -> str:
    x = runs[0].row
    if x["warmup"] == "none":
        return f"lr {x['lr']:.3g}, no warmup"
    return f"lr {x['lr']:.3g}, {x['warmup']} warmup {x['warmup_epochs']:g} ep"


def beyond_tables(methods: Methods) -> list[str]:
    """Markdown: every run beyond the recipe (a probe beside the recipe at its last epoch), then Figure 1
    (methods): the recipe's ladder and each method's best setting at each kn, as gaps from the baseline."""
    ref = methods.reference
    base = ref.baseline() if ref else []
    zg = methods.runs[0].row["zero_gamma"]
    out = ["", "## Beyond the paper: other methods at large kn", "",
           f"Runs of the study beyond its recipe; gaps are from the recipe's baseline (kn {ref.base_kn if ref else '-'}, "
           f"{cell(base)} %, zero-gamma {zg}). A run stopped before its planned epochs (a probe, "
           "`checkpoint.stop_after_epoch`, or a run not finished yet) shows its last epoch's val error beside the "
           "recipe's run of the same kn and seed at that epoch.", "",
           "| method | kn | lr | warmup | epochs | val error % | vs baseline (points) | last epoch: train / val error % "
           "| seeds |", "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in methods.runs:
        x = r.row
        groups[(methods.method(r), x["kn"], x["lr"], x["warmup"], x["warmup_epochs"], finished(r), x["epochs"])].append(r)
    for (method, kn, lr, warmup, w_ep, done, ep), rs in sorted(groups.items()):
        planned = rs[0].row["planned_epochs"]
        if done:
            value, vs = cell(rs), gap(ref, rs) if ref else "-"
            epochs = str(ep)
        else:  # a probe: the last epoch, beside the recipe at the same epoch
            value = f"{100 * statistics.mean(r.epochs[-1]['val/err'] for r in rs):.2f} (epoch {ep})"
            ref_vals = [v for v in (methods.recipe_at_epoch(r, ep) for r in rs) if v is not None]
            vs = f"recipe at epoch {ep}: {100 * statistics.mean(ref_vals):.2f}" if ref_vals else "-"
            probe = any((r.cfg.get("checkpoint") or {}).get("stop_after_epoch") for r in rs)
            epochs = f"{ep} of {planned} ({'probe' if probe else 'unfinished'})"
        out.append(f"| {method} | {kn} | {lr:.3g} | {warmup_label(warmup, w_ep)} | {epochs} | {value} | {vs} | {last(rs)} "
                   f"| {seeds(rs)} |")
    best = methods.best()
    if ref is None or not best:
        return out
    ladder = ref.ladder()
    kns = sorted(set(ladder) | {kn for by_kn in best.values() for kn in by_kn})
    out += ["", "Figure 1 (methods): val error % (vs the baseline, points) of the recipe and each method's best "
            "finished setting", "", "| kn | recipe (SGD, step decay, warmup "
            f"{methods.paper_warmup:g} ep) | " + " | ".join(best) + " |", "|---|---|" + "---|" * len(best)]
    for kn in kns:
        cells = [f"{cell(ladder[kn])} ({gap(ref, ladder[kn])})" if kn in ladder else "-"]
        for by_kn in best.values():
            rs = by_kn.get(kn)
            cells.append(f"{cell(rs)} ({gap(ref, rs)}; {setting_label(rs)}; seeds {seeds(rs)})" if rs else "-")
        out.append(f"| {kn} | " + " | ".join(cells) + " |")
    return out + flat_regions(methods)


def flat_regions(methods: Methods) -> list[str]:
    """Markdown: each schedule with a baseline of its own at the recipe's baseline kn (e.g. poly decay at kn
    128, no warmup) against that baseline, the recipe's baseline and the recipe at the same kn; then where
    each one's flat region ends (:func:`flat_edge`). Empty where no method has its own baseline."""
    ref, best, own = methods.reference, methods.best(), methods.own_baselines()
    if ref is None or not own:
        return []
    ladder, base = ref.ladder(), ref.baseline()
    schedules = {f"recipe (SGD, step decay, warmup {methods.paper_warmup:g} ep)": (ladder, base),
                 **{method: (best[method], runs) for method, runs in own.items()}}
    out = ["", f"Flat region per schedule: each schedule's best finished setting per kn against its own baseline "
           f"(kn {ref.base_kn}), the recipe's baseline and the recipe at the same kn; val error %, gaps in points", "",
           "| schedule | kn | val error % | vs its own baseline | vs the recipe's baseline | vs the recipe at this kn "
           "| seeds |", "|---|---|---|---|---|---|---|"]
    edges = []
    for name, (lad, own_base) in schedules.items():
        for kn, rs in lad.items():
            out.append(f"| {name} | {kn} | {cell(rs)} | {points(rs, own_base)} | {points(rs, base)} "
                       f"| {points(rs, ladder.get(kn, []))} | {seeds(rs)} |")
        edge = flat_edge(lad, own_base)
        edges.append(f"{name}: kn {edge if edge is not None else '-'}")
    return out + ["", "Flat region (the largest kn within 1 point of its own schedule's baseline, every smaller kn "
                  "too): " + "; ".join(edges) + "."]