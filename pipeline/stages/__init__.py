"""The stages of a run (prepare, train, fold, export, bench, report), the thin runner, and the
run directory that owns every path and record."""
