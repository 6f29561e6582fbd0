"""The small contract every method keeps, and the helpers they share.

A method (a) wraps or unfreezes the layers it adapts (``prepare``), (b) adds its
regulariser to the task loss (``regulariser``), and (c) emits a ``TaskDelta``
(``task_delta``). Training, folding, bundling and export only ever see these three.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from torch.nn.utils import parametrize

from pipeline.backbones import TaskNet
from pipeline.delta import Head, Norm, Replace, TaskDelta, own_tensors

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
ADAPTABLE_TYPES = (nn.Conv2d, nn.Linear)


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Method:
    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # False: the backbone's norms keep the base statistics (eval mode while training)
    task_norms: ClassVar[bool] = True

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.Config()

    def prepare(self, model: TaskNet) -> None:
        """Freeze what is shared, make trainable (or wrap) what is task-specific. In place."""
        set_trainable(model, norms=self.task_norms)

    def regulariser(self, model: TaskNet, epoch: int) -> torch.Tensor | None:
        return None

    def task_delta(self, model: TaskNet, task: str) -> TaskDelta:
        raise NotImplementedError

    def describe(self, model: TaskNet) -> dict:
        """Method-specific facts for the report (e.g. which layers became task-specific)."""
        return {}

    def train_mode(self, model: TaskNet) -> None:
        model.train()
        if not self.task_norms:
            for m in model.features.modules():
                if isinstance(m, NORM_TYPES):
                    m.eval()


def set_trainable(model: TaskNet, norms: bool) -> None:
    """Freeze everything, then unfreeze the head and (optionally) every norm layer."""
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    if norms:
        for m in norm_layers(model):
            m.requires_grad_(True)


def norm_layers(model: TaskNet) -> list[nn.Module]:
    return [m for m in model.features.modules() if isinstance(m, NORM_TYPES)]


def adaptable_layers(model: TaskNet) -> list[tuple[str, nn.Module]]:
    """Every Conv2d and Linear of the backbone (depthwise convs and attention linears included)."""
    return [(f"features.{p}", m) for p, m in model.features.named_modules() if isinstance(m, ADAPTABLE_TYPES)]


def parametrized_layers(model: nn.Module, kind: type[nn.Module]) -> list[tuple[str, nn.Module, nn.Module]]:
    """(path, layer, parametrisation) for every layer whose ``weight`` a ``kind`` parametrises."""
    out = []
    for path, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], kind):
            out.append((path, m, m.parametrizations.weight[0]))
    return out


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the module's own float tensors (integer counters are not task state)."""
    return {k: v.detach().clone() for k, v in own_tensors(module).items() if v.is_floating_point()}


def norm_entries(model: TaskNet) -> dict[str, Norm]:
    out = {}
    for p, m in model.features.named_modules():
        if isinstance(m, NORM_TYPES) and (values := _snapshot(m)):
            out[f"features.{p}"] = Norm(values)
    return out


def head_entry(model: TaskNet) -> dict[str, Head]:
    return {"head": Head(model.head.weight.detach().clone(), model.head.bias.detach().clone())}


def all_tensor_entries(model: TaskNet) -> dict[str, Replace]:
    """Replace entries for every non-norm module of the backbone that owns tensors."""
    out = {}
    for p, m in model.features.named_modules():
        if isinstance(m, NORM_TYPES):
            continue
        if values := _snapshot(m):
            out[f"features.{p}" if p else "features"] = Replace(values)
    return out
