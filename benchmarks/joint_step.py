"""How a joint training step grows with the number of tasks K, as ratios measured in one run.

A joint step runs one batch of every task (forward and backward per task, one optimiser
step), so its time should be about K incremental fine-tune steps, and its peak memory should
grow only by the per-task parameters (norms, heads; joint TAPS: K dense deltas), not by K
batches of activations (each task's backward runs before the next task's forward).

Time: every (method, K) step and a plain fine-tune step interleaved in rounds; reported as
joint step / (K x fine-tune step). Memory: each (method, K) in a fresh interpreter, peak RSS
after a few steps (``--no-memory`` skips it).

    .venv/bin/python benchmarks/joint_step.py [--tasks 1 2 4] [--image-size 64] [--batch 64]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.core.backbones import build_backbone
from pipeline.data import Split, TaskData
from pipeline.methods import build_method
from pipeline.methods.context import Schedule
from pipeline.training.incremental import TaskTrainer
from pipeline.training.joint import JointTrainer, joint_context


def synthetic_tasks(k: int, n: int, size: int) -> dict[str, TaskData]:
    gen = torch.Generator().manual_seed(0)
    split = lambda: Split(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen),  # noqa: E731
                          torch.randint(0, 10, (n,), generator=gen))
    return {f"t{i}": TaskData(f"t{i}", 10, split(), split(), split()) for i in range(k)}


def joint_step(bb, method_name: str, k: int, size: int, batch: int):
    """The joint trainer's own step (``JointTrainer.step``) of ``method_name`` over ``k`` tasks."""
    tasks = synthetic_tasks(k, batch, size)
    method = build_method(method_name)
    schedule = Schedule(1, batch, 1e-3, head_lr_scale=10)
    epoch = 0
    if method_name == "adashare":  # the search's weight step: every block a soft mixture
        from pipeline.core.blocks import skippable_blocks

        method.context = joint_context(bb, tasks, schedule, 0)
        method.blocks = [f"features.{p}" for p in skippable_blocks(bb.features, size)]
        method.stage = "search"
        epoch = method.config.warmup_epochs + method.config.search_epochs - 1  # every block free
    trainer = JointTrainer(bb, tasks, method, schedule, seed=0, progress=False)
    method.start_epoch(trainer.model, epoch)
    method.train_mode(trainer.model)
    batches = {t: (d.train.images, d.train.labels) for t, d in tasks.items()}
    return lambda: trainer.step(batches, epoch, "weights")


def finetune_step(bb, size: int, batch: int):
    """The incremental trainer's own fine-tune step, on one task of the same size."""
    data = synthetic_tasks(1, batch, size)["t0"]
    trainer = TaskTrainer(bb, data, build_method("finetune"), Schedule(1, batch, 1e-3, head_lr_scale=10), seed=0,
                          progress=False)
    trainer.method.train_mode(trainer.model)
    return lambda: trainer.step(data.train.images, data.train.labels, 0)


def peak_rss_mib(args, method: str, k: int) -> float:
    """Peak RSS of a fresh interpreter that builds (method, k) and takes 3 steps."""
    code = (f"import sys; sys.argv=['x']; import torch; torch.set_num_threads({args.threads});"
            f"from benchmarks.joint_step import *; bb = build_backbone({args.backbone!r}, {args.weights!r});"
            f"s = joint_step(bb, {method!r}, {k}, {args.image_size}, {args.batch}); [s() for _ in range(3)];"
            "print(peak_rss_kib())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM). Not ``getrusage``'s ru_maxrss: Linux carries that over
    from the parent through fork and exec, so a child would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise OSError("no VmHWM in /proc/self/status")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="packaged")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--methods", default="joint_finetune,joint_taps,adashare")
    p.add_argument("--steps", type=int, default=6, help="timed steps per target")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bb = build_backbone(args.backbone, args.weights)
    targets = {"finetune": finetune_step(bb, args.image_size, args.batch)}
    for m in args.methods.split(","):
        for k in args.tasks:
            targets[f"{m}/K{k}"] = joint_step(bb, m, k, args.image_size, args.batch)
    for step in targets.values():  # warm-up
        step()
    times = {k: [] for k in targets}
    rng = np.random.default_rng(0)
    for _ in range(args.steps):
        for key in rng.permutation(list(targets)):
            t0 = time.perf_counter()
            targets[key]()
            times[key].append(time.perf_counter() - t0)
    ft = float(np.median(times["finetune"]))
    rows = {}
    print(f"{'target':<22} {'median ms':>10} {'/ (K x finetune)':>17} {'peak RSS MiB':>13}")
    for key, ts in times.items():
        k = int(key.rsplit("K", 1)[1]) if "/K" in key else 1
        med = float(np.median(ts))
        rss = None
        if not args.no_memory and key != "finetune":
            rss = peak_rss_mib(args, key.split("/")[0], k)
        rows[key] = {"median_ms": 1e3 * med, "ratio_to_k_finetune": med / (k * ft), "peak_rss_mib": rss}
        print(f"{key:<22} {1e3 * med:>10.1f} {med / (k * ft):>17.3f} {'-' if rss is None else f'{rss:.0f}':>13}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
