"""Finding the layers a method adapts, and reading task state off a model as delta entries."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from pipeline.core.backbones import TaskNet
from pipeline.core.delta import Head, Norm, Replace, own_tensors
from pipeline.methods.multitask import MultiTaskNet, TaskNorms

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
ADAPTABLE_TYPES = (nn.Conv2d, nn.Linear)


def set_trainable(model: TaskNet, norms: bool) -> None:
    """Freeze everything, then unfreeze the head and (optionally) every norm layer."""
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    if norms:
        for m in norm_layers(model):
            m.requires_grad_(True)


def norm_layers(model: TaskNet) -> list[nn.Module]:
    return [m for m in model.features.modules() if isinstance(m, NORM_TYPES)]


def adaptable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
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


def norm_entries(model: TaskNet, statistics: bool = True) -> dict[str, Norm]:
    """Every norm layer's task values: affine parameters, and running statistics unless the
    task keeps the base's (``statistics`` False)."""
    out = {}
    for p, m in model.features.named_modules():
        if isinstance(m, NORM_TYPES):
            values = _snapshot(m) if statistics else {k: v.detach().clone() for k, v in m.named_parameters(recurse=False)}
            if values:
                out[f"features.{p}"] = Norm(values)
    return out


def joint_norm_entries(model: MultiTaskNet) -> dict[str, Norm]:
    """The active task's norms, at the paths the shared base keeps its plain norms."""
    out = {}
    for p, m in model.features.named_modules():
        if isinstance(m, TaskNorms) and (values := _snapshot(m.per_task[m.active])):
            out[f"features.{p}"] = Norm(values)
    return out


def head_entry(model: TaskNet | MultiTaskNet) -> dict[str, Head]:
    """The head (a ``MultiTaskNet``'s: the active task's)."""
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


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of every norm layer (task norms of a MultiTaskNet included)."""
    return [p for m in model.features.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)
            if p.requires_grad]
