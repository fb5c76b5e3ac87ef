"""``lbsgd plot``: the paper's tables and figures from run directories alone.

    lbsgd plot RUN_OR_SWEEP_DIR... [--out DIR]

Every folder below the given paths that holds a ``config.yaml`` and a ``metrics.jsonl`` (written by
``lbsgd train``) is one run; ``summary.json`` adds whether it diverged and ``run_info.json`` the device
it ran on. Nothing else is read, so a user's own ImageNet sweep gets the same figures as the CIFAR runs
of ``results/``. The runs of one network and schedule are one study; which run plays which part follows
from the configs, as in the paper:

- the **baseline** is the smallest ``kn`` (§5.2: ``kn = 256``);
- Table 1 and Figure 2 compare the warmups at every ``kn`` run with more than one warmup mode (the
  paper's is 8k, §5.2); the largest of them is the **large** ``kn`` of Figure 4;
- the **ladder** of Figures 1 and 3 is every ``kn`` under the study's recipe (gradual warmup and the
  rule, zero-gamma and ``optim.base_lr`` most of its runs have: the paper's linear rule and zero-gamma
  unless a sweep changed them all); Table 2a varies the rate, by
  ``optim.lr_rule`` or by ``optim.base_lr`` (the paper's ``0.05·k`` and ``0.2·k`` rows), and Table 2b
  ``model.zero_init_residual``, at whichever ``kn`` they were run.

Where one of those settings was changed for a study of its own (e.g. the ladder and Table 1 rerun with
``model.zero_init_residual=false``: three or more ``kn``, or more than one warmup at one), that setting's
runs also get a Table 1 and Figure 1 of their own, named after it (``zg-off``), with figures in a
subfolder ``<study>_zg-off``.

Runs of different networks (depth, and a CIFAR ResNet's ``model.shortcut``), planned epochs, precisions or
devices (the same study on a CPU and on a GPU) are separate studies, each with its own tables and figures (in a subfolder of ``--out`` named after it);
where two or more studies (or settings) have a ladder from the same baseline ``kn``, Figure 1 is also drawn
and tabulated across them (does the flat region move with the number of steps?).

Where the same run (network, schedule, precision, setting and seed) was done on more than one device,
``tables.md`` also sets them side by side: how far a device moves a result, beside the seed spread.
Where two or more networks or schedules ran zero-gamma on and off at one kn, Table 2b is set across them
(its cost on each network: what explains it, e.g. option A's zero-padded shortcuts against projections).

Writes ``summary.csv`` (one row per run), ``tables.md`` and, with matplotlib (``pip install
'lbsgd[plots]'``), ``fig1_err_vs_kn.png`` ... ``fig4_train_val.png``. A diverged run is shown as
diverged, never as a number, and is left out of means. Errors are the median val error of the last
5 epochs (the paper's metric, §5.1 footnote), mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .figures import comparison_figure, figures, methods_figure
from .runs import find_runs, write_summary
from .studies import Methods, Study, split_methods, split_studies
from .tables import beyond_tables, comparison, device_pairs, tables, zero_gamma_pairs


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lbsgd plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="run directories or folders holding them (sweeps)")
    ap.add_argument("--out", type=Path, default=Path("plots"), help="where the tables and figures go (default plots/)")
    ap.add_argument("--no-figures", action="store_true", help="tables and summary.csv only (no matplotlib needed)")
    args = ap.parse_args(argv)
    runs = find_runs(args.paths)
    args.out.mkdir(parents=True, exist_ok=True)
    write_summary(runs, args.out / "summary.csv")
    studies: dict[str, Study] = {}
    methods: dict[str, Methods] = {}  # runs beyond the paper (results/beyond.md), per study
    for name, members in split_studies(runs).items():
        paper, beyond = split_methods(members)
        if paper:
            studies[name] = Study.of(paper)
        if beyond:
            methods[name] = Methods.of(paper, beyond)
    variants = {f"{name}_{v}": vs for name, study in studies.items() for v, vs in study.variants.items()}
    every = {**studies, **variants}  # the variants' tables are in their study's; their figures are their own
    several = len(studies.keys() | methods.keys()) > 1
    lines: list[str] = comparison(every) + device_pairs(runs) + zero_gamma_pairs(runs)
    for name in sorted(studies.keys() | methods.keys()):
        if several:  # several networks or schedules: one set of tables and figures each
            lines += [f"## {name}", ""]
        lines += (tables(studies[name]) if name in studies else []) + (
            beyond_tables(methods[name]) if name in methods else []) + [""]
    (args.out / "tables.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out / 'summary.csv'} ({len(runs)} runs), {args.out / 'tables.md'}", file=sys.stderr)
    if not args.no_figures:
        written = comparison_figure(every, args.out)
        for name, study in every.items():
            out = args.out / name if several or name in variants else args.out
            written += figures(study, out)
        for name, m in methods.items():
            written += methods_figure(m, args.out / name if several else args.out)
        for p in written:
            print(f"wrote {p}", file=sys.stderr)
    return 0