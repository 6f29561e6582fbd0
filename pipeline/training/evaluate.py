"""Accuracy on a split, and BatchNorm statistics re-estimated after training; both in float32,
on the unit's device, each process over its share of the split and reduced across processes."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.core.compare import channels_last
from pipeline.data import BadImages, Split
from pipeline.methods.multitask import MultiTaskNet, TaskNorms
from pipeline.training.runtime import Runtime

BN = nn.modules.batchnorm._BatchNorm
# Batches of 64 in channels-last (``channels_last``): on a CPU, EfficientNet-Lite0 at 64 px evaluated
# 1.5 ms per image against 3.9 in NCHW batches of 256 (1 thread; the batches that fit the caches win)
EVAL_BATCH = 64
SAMPLE_IMAGES = 256  # test images a unit's fold check runs on


def batches(split: Split, batch_size: int, runtime: Runtime, bad: BadImages | None = None):
    """This process's share of ``split`` in order, on the device, channels-last (each image once overall)."""
    bad = bad or BadImages(runtime.on_bad_image)
    for batch in split.loader(batch_size, rank=runtime.rank, world=runtime.world, pad=False):
        bad.check(batch, split.dataset.where)
        if len(batch.y):
            x, y = batch.x.to(runtime.device, non_blocking=True), batch.y.to(runtime.device, non_blocking=True)
            yield channels_last(x), y


@dataclass
class Sample:
    """The first images this process evaluated and the model's logits on them: a later check of
    the same model on those images (the fold check) reuses them instead of running them again."""

    inputs: torch.Tensor
    logits: torch.Tensor


@torch.no_grad()
def evaluate_with_sample(model: nn.Module, split: Split, runtime: Runtime | None = None, batch_size: int = EVAL_BATCH,
                         sample_images: int = SAMPLE_IMAGES) -> tuple[float, Sample | None]:
    """Accuracy on ``split`` (over all processes), and this process's first ``sample_images``
    images with their logits (None if it evaluated none)."""
    runtime = runtime or Runtime()
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    left = sample_images
    for x, y in batches(split, batch_size, runtime):
        logits = model(x)
        if left > 0:
            kept.append((x[:left], logits[:left]))
            left -= len(kept[-1][0])
        counts[0] += (logits.argmax(1) == y).sum()
        counts[1] += len(y)
    runtime.all_sum(counts)
    sample = Sample(torch.cat([x for x, _ in kept]), torch.cat([z for _, z in kept])) if kept else None
    return float(counts[0] / counts[1].clamp_min(1)), sample


def evaluate(model: nn.Module, split: Split, runtime: Runtime | None = None, batch_size: int = EVAL_BATCH) -> float:
    return evaluate_with_sample(model, split, runtime, batch_size, sample_images=0)[0]


@torch.no_grad()
def _estimate(model: nn.Module, norms: list[BN], split: Split, runtime: Runtime, batch_size: int) -> None:
    """Cumulative batch statistics of ``norms`` over ``split`` (as ``torch.optim.swa_utils.update_bn``),
    averaged over the processes."""
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the whole split
    was = model.training
    model.train()
    for x, _ in batches(split, batch_size, runtime):
        model(x)
    for bn, m in zip(norms, momenta):
        bn.momentum = m
        if runtime.distributed:
            for t in (bn.running_mean, bn.running_var):
                runtime.all_sum(t).div_(runtime.world)
    model.train(was)


def recalibrate_norms(model: nn.Module, split: Split, runtime: Runtime | None, batch_size: int) -> None:
    """Re-estimate BatchNorm running statistics over the whole training split.

    In short schedules the running averages (momentum 0.1) trail the weights; an exact
    population estimate after training is worth up to a few points of accuracy here.
    """
    norms = [m for m in model.modules() if isinstance(m, BN)]
    if norms:
        _estimate(model, norms, split, runtime or Runtime(), batch_size)


def recalibrate_task_norms(model: MultiTaskNet, splits: dict[str, Split], runtime: Runtime | None,
                           batch_size: int) -> None:
    """Each task's BatchNorm statistics re-estimated over its own train split, touching no other
    task's copies."""
    for i, t in enumerate(model.tasks):
        model.use(t)
        norms = [m.per_task[i] for _, m in model.switches(TaskNorms) if isinstance(m.per_task[i], BN)]
        _estimate(model, norms, splits[t], runtime or Runtime(), batch_size)
    model.eval()
