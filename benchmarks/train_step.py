"""Training-step cost of each method against a plain fine-tune step, as ratios in one run.

Same model (EfficientNet-Lite0, packaged weights), same batch; each method's step is the
trainer's own (``TaskTrainer.step``, with the method's optimiser groups); the steps of all
methods are interleaved in rounds so machine drift hits them alike.

    .venv/bin/python benchmarks/train_step.py [--image-size 64] [--batch 64] [--steps 10]
        [--device cpu|cuda] [--precision fp32|bf16|fp16] [--backbone torchvision:resnet50 --weights none]
        [--torch-kernels]   # each method also with PyTorch's own CPU kernels only (no
                            # pipeline.training.depthwise), interleaved: the kernel's gain as a ratio
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from pipeline.config import TaskConfig
from pipeline.core.backbones import build_backbone
from pipeline.data import load_task
from pipeline.methods import build_method
from pipeline.methods.context import Schedule
from pipeline.training.incremental import TaskTrainer
from pipeline.training.runtime import Runtime, resolve_device


def make_step(bb, method_name: str, x: torch.Tensor, y: torch.Tensor, digits, schedule: Schedule, runtime: Runtime):
    """The trainer's own step (``TaskTrainer.step``: forward and loss under the run's autocast,
    regulariser, backward, the method's optimiser groups) in the last epoch's stage (CWPS: the
    hard mask), on the device."""
    method = build_method(method_name)
    trainer = TaskTrainer(bb, digits, method, schedule, seed=0, progress=False, runtime=runtime)  # CWPS searches here
    epoch = schedule.epochs - 1
    method.start_epoch(trainer.model, epoch)
    method.train_mode(trainer.model)
    x, y = x.to(runtime.device), y.to(runtime.device)

    def step():
        trainer.step(x, y, epoch)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="packaged")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed steps per method")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", default="finetune,taps,ftn,cwps,norm_head,linear_probe")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--torch-kernels", action="store_true",
                   help="also time each method with PyTorch's own CPU kernels only (label 'METHOD/torch')")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    runtime = Runtime(resolve_device(args.device), args.precision)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bb = build_backbone(args.backbone, args.weights)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch,))
    names = args.methods.split(",")
    digits = load_task(TaskConfig(name="digits", source={"type": "digits"}, train_size=128, val_size=32, test_size=32),
                       args.image_size, 0)
    schedule = Schedule(epochs=4, batch_size=args.batch, lr=1e-3, head_lr_scale=10)
    steps = {n: make_step(bb, n, x, y, digits, schedule, runtime) for n in names}
    if args.torch_kernels:
        plain = dataclasses.replace(runtime, depthwise_kernels=False)
        steps |= {f"{n}/torch": make_step(bb, n, x, y, digits, schedule, plain) for n in names}
        steps = {k: steps[k] for n in names for k in (n, f"{n}/torch")}  # each next to its twin
    for s in steps.values():  # warm-up
        s(), s()
    times: dict[str, list[float]] = {n: [] for n in steps}
    rounds = 5
    for _ in range(rounds):
        for n, s in steps.items():
            for _ in range(max(1, args.steps // rounds)):
                t0 = time.perf_counter()
                s()
                times[n].append(time.perf_counter() - t0)
    ref = float(np.median(times["finetune"])) if "finetune" in times else None
    out = {"backbone": args.backbone, "image_size": args.image_size, "batch": args.batch, "threads": args.threads,
           "device": str(runtime.device), "precision": args.precision, "methods": {}}
    print(f"{args.backbone} {args.image_size}px, batch {args.batch}, {args.threads} threads, {runtime.device}, "
          f"{args.precision}")
    print(f"{'method':20s} {'median ms/step':>15s} {'p90':>8s} {'images/s':>9s} {'x finetune':>11s}"
          + (f" {'x torch kernels':>16s}" if args.torch_kernels else ""))
    for n, t in times.items():
        med, p90 = float(np.median(t)) * 1e3, float(np.percentile(t, 90)) * 1e3
        ratio = med / (ref * 1e3) if ref else None
        ips = args.batch / (med / 1e3)
        out["methods"][n] = {"median_ms": med, "p90_ms": p90, "images_per_s": ips, "ratio_to_finetune": ratio}
        line = f"{n:20s} {med:15.1f} {p90:8.1f} {ips:9.0f} {ratio if ratio else float('nan'):11.3f}"
        if args.torch_kernels and not n.endswith("/torch"):
            own = med / (float(np.median(times[f"{n}/torch"])) * 1e3)
            out["methods"][n]["ratio_to_torch_kernels"] = own
            line += f" {own:16.3f}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
