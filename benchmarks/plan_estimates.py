"""Which estimate buys the planner more test accuracy: validation accuracy as measured, or shrunk
toward each entry's strength on the other tasks (``pipeline.shrinkage``)? Plans every run
directory at every budget both ways, without writing bundles, and prints the chosen sets'
mean test accuracy (a split the choice never saw), beside the best single entry used for every
task within the same budget (what a mix has to beat).

    .venv/bin/python benchmarks/plan_estimates.py runs/seeds/seed0 runs/seeds/seed1 ... \
        [--budgets 1.1 1.2 1.5 2.0] [--json out.json]

Run it over seeds (``benchmarks/seeds.py``): on one run, one lucky cell decides.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from pipeline.config import parse_config
    from pipeline.core.io import read_json
    from pipeline.planner import ESTIMATES, PlanError, best_single, choose, estimated, items_of
    from pipeline.stages.rundir import RunDir

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="finished run directories (fold stage done)")
    p.add_argument("--budgets", type=float, nargs="+", default=[1.1, 1.2, 1.5, 2.0])
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    rows = []
    for path in args.runs:
        run = RunDir(Path(path))
        cfg = parse_config(read_json(run.config_file), str(run.config_file), check_paths=False)
        items, sizes, base_params, _ = items_of(run, cfg)
        tasks = [t.name for t in cfg.tasks]
        for kind in ESTIMATES:
            scored, how = estimated(items, run, kind)
            for budget in args.budgets:
                if kind == "raw" and (one := best_single(scored, tasks, sizes, base_params, budget)):
                    rows.append({"run": path, "estimate": "single", "budget": budget, "n_x_base": one.n_x_base,
                                 "mean_test_acc": one.mean_test, "chosen": {t: i.label for t, i in one.items.items()}})
                try:
                    c = choose(scored, tasks, sizes, base_params, budget)
                except PlanError as err:
                    print(f"{path} {kind} {budget}x: {err}")
                    continue
                rows.append({"run": path, "estimate": kind, "budget": budget, "n_x_base": c.n_x_base,
                             "mean_test_acc": c.mean_test, "chosen": {t: i.label for t, i in c.items.items()}})
                print(f"{path} {kind:6s} {budget:g}x: {c.n_x_base:.3f} x base, test {c.mean_test:.4f}  "
                      + ", ".join(f"{t}<-{i.label}" for t, i in c.items.items()), flush=True)
    kinds = (*ESTIMATES, "single")
    print("\nMean test accuracy of the plans (per run); single: the best one entry for every task within the budget")
    print("\n| budget | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds))
    for budget in args.budgets:
        cells = []
        for kind in kinds:
            accs = [r["mean_test_acc"] for r in rows if r["budget"] == budget and r["estimate"] == kind]
            cells.append(f"{statistics.fmean(accs):.4f} ({', '.join(f'{a:.4f}' for a in accs)})" if accs else "-")
        print(f"| {budget:g}x | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
