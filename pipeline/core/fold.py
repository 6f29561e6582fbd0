"""Fold: base model + TaskDelta -> a plain merged model or a shared-plus-delta model, and
the check that they are exact.

The merged model is a ``TaskNet`` of the base architecture with no adapter classes left:
same graph, same latency as the base. The shared-plus-delta model holds the base once and
each task's delta as it is stored (low-rank factors stay factors). Equivalence is checked
on real task images.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

from pipeline.core.backbones import TaskNet
from pipeline.core.compare import compare_logits, model_logits
from pipeline.core.delta import TaskDelta


def merge(base: TaskNet, delta: TaskDelta, branches: bool = False) -> TaskNet:
    """Apply every entry of ``delta`` to a copy of ``base``; the base is left untouched.
    ``branches``: entries that offer a side branch (``Delta.branch``) keep the base layer and
    add the branch instead of changing its weight, so the base weights stay shared."""
    model = copy.deepcopy(base)
    for path, entry in delta.entries.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise KeyError(f"task {delta.task!r}: delta entry {path!r} names no module of this backbone") from None
        new = entry.branch(module) if branches else None
        if new is None:
            new = entry.apply(module)
        if new is not module:
            model.set_submodule(path, new)
    return model.eval()


def compare(reference: nn.Module, candidate: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Max abs logit difference and argmax agreement of two models on ``x`` (eval mode)."""
    return compare_logits(model_logits(reference, x), model_logits(candidate, x))


class SharedPlusDelta(nn.Module):
    """One copy of the base for K tasks; ``forward(x, task)`` runs the base with that task's
    overlay tensors swapped in (``torch.func.functional_call``), so the base is never copied
    and a low-rank task keeps only its factors: its dense weight exists only while a layer
    runs. Kinds that replace a module (the head) keep a per-task module."""

    def __init__(self, base: TaskNet, deltas: list[TaskDelta]):
        super().__init__()
        self.base = base.eval()
        self.deltas = {d.task: d for d in deltas}
        self.task_modules = nn.ModuleDict()
        self._replaced: dict[str, dict[str, str]] = {}  # task -> path -> key in task_modules
        for d in deltas:
            self._replaced[d.task] = {}
            for path, entry in d.entries.items():
                module = base.get_submodule(path)
                if entry.overlay(module) is None:
                    key = f"{d.task}--{path}".replace(".", "_")
                    self.task_modules[key] = entry.apply(copy.deepcopy(module))
                    self._replaced[d.task][path] = key

    @property
    def tasks(self) -> list[str]:
        return list(self.deltas)

    def overlay(self, task: str) -> dict[str, torch.Tensor]:
        d = self.deltas[task]
        out = {}
        for path, entry in d.entries.items():
            if path not in self._replaced[task]:
                for name, t in entry.overlay(self.base.get_submodule(path)).items():
                    out[f"{path}.{name}"] = t
        return out

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        if task not in self.deltas:
            raise KeyError(f"no task {task!r}; tasks: {self.tasks}")
        swapped = {p: self.task_modules[k] for p, k in self._replaced[task].items()}
        originals = {p: self.base.get_submodule(p) for p in swapped}
        for p, m in swapped.items():
            self.base.set_submodule(p, m)
        try:
            return functional_call(self.base, self.overlay(task), (x,))
        finally:
            for p, m in originals.items():
                self.base.set_submodule(p, m)

    def stored_values(self) -> dict[str, int]:
        """Values held: the base once, and per task what its delta stores (no dense copies)."""
        out = {"base": sum(t.numel() for t in self.base.state_dict().values() if t.is_floating_point())}
        for task, d in self.deltas.items():
            out[task] = sum(t.numel() for t in d.flat_tensors().values())
        return out
