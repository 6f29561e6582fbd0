"""One config over several seeds: every entry's mean test accuracy and N x base as mean, spread
(sample standard deviation) and range over the seeds. A seed changes the data subsets, the
initialisation and the order, so this is the run-to-run noise a comparison must beat.

    .venv/bin/python benchmarks/seeds.py examples/quickstart.yaml --seeds 0 1 2 [--out runs/seeds]
        [--until fold] [--methods ftn,lora] [--json seeds.json]

Each seed is a run directory of its own (``OUT/seed<k>``), resumable like any run; training and
folding are enough for the accuracies (``--until fold``, the default).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def main() -> None:
    import pipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", help="default: runs/<config name>-seeds")
    p.add_argument("--until", default="fold", choices=["fold", "report"])
    p.add_argument("--methods", help="comma-separated labels (default: every entry)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    raw = yaml.safe_load(Path(args.config).read_text())
    if args.methods:
        keep = set(args.methods.split(","))
        raw["methods"] = [m for m in raw["methods"] if (m if isinstance(m, str) else m.get("label", m["name"])) in keep]
    out = Path(args.out or f"runs/{Path(args.config).stem}-seeds")
    per: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds:
        cfg = dict(raw, run=dict(raw.get("run", {}), seed=seed))
        t0 = time.perf_counter()
        run = out / f"seed{seed}"
        pipeline.run(cfg, out=run, until=args.until, log=lambda s: None)
        fold = json.loads((run / "stages" / "fold.json").read_text())
        for label, ledger in fold["ledgers"].items():
            accs = [json.loads((run / "train" / label / t / "result.json").read_text())["test_acc"]
                    for t in ledger["tasks"]]
            row = per.setdefault(label, {"mean_test_acc": [], "n_x_base": []})
            row["mean_test_acc"].append(statistics.fmean(accs))
            row["n_x_base"].append(ledger["total"]["n_x_base"])
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    results = {label: {k: summary(v) for k, v in row.items()} for label, row in per.items()}
    print(f"\n{args.config}, seeds {args.seeds}: mean test accuracy over the tasks")
    print("| entry | mean | spread (std) | range | N x base |\n|---|---|---|---|---|")
    for label, r in results.items():
        a, n = r["mean_test_acc"], r["n_x_base"]
        print(f"| {label} | {a['mean']:.4f} | {a['std']:.4f} | {a['min']:.4f}-{a['max']:.4f} | {n['mean']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "seeds": args.seeds, "results": results},
                                              indent=1))


if __name__ == "__main__":
    main()
