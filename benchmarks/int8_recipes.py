"""INT8 recipes against FP32 on a finished run's merged models: accuracy change per task model
and latency, every recipe through the pipeline's own ``to_int8``.

Accuracy is on each task's test split, calibration on the run's ``export.calibration_images``
train images (as the export stage does). Latency is one model's (the first label and task),
all recipes and FP32 timed in one interleaved run, as ratios to FP32.

    .venv/bin/python benchmarks/int8_recipes.py runs/quickstart [--labels finetune,norm_head] [--tasks fmnist]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from exporters.latency import batched_logits
from exporters.precision import to_int8
from exporters.latency import measure
from exporters.runtime import session
from exporters.precision import Int8Recipe
from pipeline.config import parse_config
from pipeline.core.io import read_json
from pipeline.stages.context import StageContext
from pipeline.stages.rundir import RunDir

OLD = {"bias_correction": False, "depthwise_full_range": False}  # the recipe before both existed
RECIPES = {
    "int8w_u8a_q1": Int8Recipe(reduce_range=False, float_first_conv=False, **OLD),
    "int8w_u8a_f1": Int8Recipe(reduce_range=False, **OLD),
    "int8w7_u8a_q1": Int8Recipe(float_first_conv=False, **OLD),
    "int8w7_u8a_f1": Int8Recipe(**OLD),
    "u8w_u8a_f1": Int8Recipe(weights="uint8", reduce_range=False, **OLD),
    "int8w_s8a_f1": Int8Recipe(activations="int8", reduce_range=False, **OLD),
    "int8w7_pct": Int8Recipe(calibration="percentile", **OLD),
    "int8w7_pct9999": Int8Recipe(calibration="percentile", percentile=99.99, **OLD),
    "int8w7_last1": Int8Recipe(float_last=1, **OLD),
    "int8w7_last2": Int8Recipe(float_last=2, **OLD),
    "int8w7_dw8": Int8Recipe(bias_correction=False),
    "int8w7_bc": Int8Recipe(depthwise_full_range=False),
    "int8w7_dw8_bc (default)": Int8Recipe(),
    "int8w_bc": Int8Recipe(reduce_range=False),
}


def accuracy(path: Path, x: np.ndarray, y: np.ndarray, threads: int) -> float:
    return float(np.mean(batched_logits(session(path, threads), x).argmax(1) == y))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="a run directory whose export stage wrote exports/<label>/<task>.onnx")
    p.add_argument("--labels", help="comma-separated method labels (default: every exported one)")
    p.add_argument("--tasks", help="comma-separated tasks (default: every task)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=100, help="timed runs per recipe and batch size")
    p.add_argument("--recipes", help="comma-separated recipe names (default: all): " + ", ".join(RECIPES))
    p.add_argument("--calibration-images", type=int, help="default: the run's export.calibration_images")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    recipes = {k: v for k, v in RECIPES.items() if not args.recipes or k.split()[0] in args.recipes.split(",")}
    run = RunDir(Path(args.run_dir))
    cfg = parse_config(read_json(run.config_file))
    ctx = StageContext(cfg, run, progress=False, log=lambda s: None)
    labels = args.labels.split(",") if args.labels else [m.label for m in cfg.methods]
    tasks = args.tasks.split(",") if args.tasks else [t.name for t in cfg.tasks]
    work = Path(tempfile.mkdtemp(prefix="int8_recipes_"))
    acc: dict[str, dict[str, float]] = {}
    for label in labels:
        for task in tasks:
            data = ctx.data(task)
            calib = data.train_eval.inputs(args.calibration_images or cfg.export.calibration_images).numpy()
            x, y = data.test.inputs().numpy(), data.test.labels.numpy()
            src = run.export(label, task)
            row = {"fp32": accuracy(src, x, y, args.threads)}
            for name, recipe in recipes.items():
                dst = work / f"{label}.{task}.{name.split()[0]}.onnx"
                row[name] = accuracy(to_int8(src, dst, calib, recipe=recipe), x, y, args.threads)
            acc[f"{label}/{task}"] = row
            print(f"{label}/{task}: fp32 {row['fp32']:.3f}, " + ", ".join(f"{k} {v - row['fp32']:+.3f}"
                                                                    for k, v in row.items() if k != "fp32"), flush=True)
    first = f"{labels[0]}.{tasks[0]}"
    targets = {"fp32": session(run.export(labels[0], tasks[0]), args.threads)}
    targets.update({k: session(work / f"{first}.{k.split()[0]}.onnx", args.threads) for k in recipes})
    latency = {f"batch{b}": measure(targets, cfg.backbone.image_size, b, runs=args.runs) for b in (1, 8)}
    summary = {}
    print(f"\n{len(acc)} task models; latency of {labels[0]}/{tasks[0]} as x FP32 (batch 1, batch 8)")
    print("| recipe | what | mean change | worst | latency b1 | latency b8 |\n|---|---|---|---|---|---|")
    for name, recipe in recipes.items():
        change = [r[name] - r["fp32"] for r in acc.values()]
        ratio = {b: latency[b][name]["median_ms"] / latency[b]["fp32"]["median_ms"] for b in latency}
        summary[name] = {"recipe": recipe.describe(), "mean_change": float(np.mean(change)),
                         "worst_change": float(min(change)), "latency_vs_fp32": ratio}
        print(f"| {name} | {recipe.describe()} | {np.mean(change):+.3f} | {min(change):+.3f} | "
              f"{ratio['batch1']:.2f} | {ratio['batch8']:.2f} |")
    print("\nmean change per method (the issue's bar: within 0.01 per method, 0.02 per task)")
    print("| recipe | " + " | ".join(labels) + " | worst task |\n|---" * 1 + "|---" * (len(labels) + 1) + "|")
    for name in recipes:
        per = [np.mean([r[name] - r["fp32"] for k, r in acc.items() if k.split("/")[0] == lb]) for lb in labels]
        summary[name]["per_method"] = dict(zip(labels, map(float, per)))
        print(f"| {name} | " + " | ".join(f"{v:+.3f}" for v in per) + f" | {summary[name]['worst_change']:+.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"accuracy": acc, "summary": summary, "latency": latency}, indent=1))


if __name__ == "__main__":
    main()
