"""Accuracy on a split, and BatchNorm statistics re-estimated after training."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.data import Split, normalise
from pipeline.methods.multitask import MultiTaskNet, TaskNorms


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, mean, std, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for x, y in split.batches(batch_size):
        correct += int((model(normalise(x, mean, std)).argmax(1) == y).sum())
    return correct / max(1, len(split))


def recalibrate_norms(model: nn.Module, split: Split, mean, std, batch_size: int) -> None:
    """Re-estimate BatchNorm running statistics over the whole training split.

    In short schedules the running averages (momentum 0.1) trail the weights; an exact
    population estimate after training is worth up to a few points of accuracy here.
    """
    from torch.optim.swa_utils import update_bn

    update_bn([normalise(x, mean, std) for x, _ in split.batches(batch_size)], model)


@torch.no_grad()
def recalibrate_task_norms(model: MultiTaskNet, splits: dict[str, Split], mean, std, batch_size: int) -> None:
    """Each task's BatchNorm statistics re-estimated over its own train split (see
    ``recalibrate_norms``), touching no other task's copies."""
    for i, t in enumerate(model.tasks):
        model.use(t)
        norms = [m.per_task[i] for _, m in model.switches(TaskNorms)
                 if isinstance(m.per_task[i], torch.nn.modules.batchnorm._BatchNorm)]
        momenta = [bn.momentum for bn in norms]
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the whole split
        model.train()
        for x, _ in splits[t].batches(batch_size):
            model(normalise(x, mean, std))
        for bn, m in zip(norms, momenta):
            bn.momentum = m
    model.eval()
