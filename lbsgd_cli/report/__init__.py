"""``lbsgd plot``: the paper's tables and figures from run directories alone (:mod:`.command`).

  runs     run directories -> :class:`~.runs.Run` (config, per-epoch records, summary row); summary.csv
  studies  runs sorted into studies and the paper's parts (baseline, Table 1, ladder, Tables 2a/2b, methods)
  tables   the markdown of tables.md
  figures  Figures 1-4 and the comparisons as PNGs (matplotlib)
  command  the ``lbsgd plot`` command line
"""
