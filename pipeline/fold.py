"""Fold: base model + TaskDelta -> a plain merged model, and the check that it is exact.

The merged model is a ``TaskNet`` of the base architecture with no adapter classes left:
same graph, same latency as the base. Equivalence is checked on real task images.
"""
from __future__ import annotations

import copy

import torch

from pipeline.backbones import TaskNet
from pipeline.delta import TaskDelta


def merge(base: TaskNet, delta: TaskDelta) -> TaskNet:
    """Apply every entry of ``delta`` to a copy of ``base``; the base is left untouched."""
    model = copy.deepcopy(base)
    for path, entry in delta.entries.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise KeyError(f"task {delta.task!r}: delta entry {path!r} names no module of this backbone") from None
        new = entry.apply(module)
        if new is not module:
            model.set_submodule(path, new)
    return model.eval()


@torch.no_grad()
def compare(reference: torch.nn.Module, candidate: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Max abs logit difference and argmax agreement of two models on one batch (eval mode)."""
    was = reference.training, candidate.training
    reference.eval(), candidate.eval()
    a, b = reference(x), candidate(x)
    reference.train(was[0]), candidate.train(was[1])
    return {
        "max_abs_diff": float((a - b).abs().max()),
        "argmax_agree": float((a.argmax(1) == b.argmax(1)).float().mean()),
    }
