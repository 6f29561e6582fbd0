"""One network for K tasks at once: shared backbone, per-task norms and heads.

``MultiTaskNet`` runs one task at a time: ``use(task)`` points every ``TaskSwitch`` module
inside it (per-task norms here; a joint method's per-task gates or block policies) at that
task, and ``forward`` then uses that task's head. After joint training ``shared_base()`` is
the plain backbone the tasks share, with every switch replaced by its task-independent
form, so each task's ``TaskDelta`` merges onto it like onto a pretrained base.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from pipeline.core.backbones import TaskNet


class TaskSwitch:
    """Mixin for modules that behave per task. ``active`` is the index of the task in use."""

    active: int = 0

    def shared(self) -> nn.Module | None:
        """The module the shared base keeps in this one's place; None for a parametrisation
        (removed with the shared weight kept)."""
        return None


class TaskNorms(nn.Module, TaskSwitch):
    """K copies of one norm layer; the base keeps the untouched original (every task
    replaces it with its own, so its values only matter as the base's)."""

    def __init__(self, norm: nn.Module, num_tasks: int):
        super().__init__()
        self.original = copy.deepcopy(norm).requires_grad_(False)
        self.per_task = nn.ModuleList(copy.deepcopy(norm) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.per_task[self.active](x)

    def shared(self) -> nn.Module:
        return copy.deepcopy(self.original)


class MultiTaskNet(nn.Module):
    """features -> pooled vector -> the active task's head."""

    def __init__(self, features: nn.Module, heads: dict[str, nn.Linear]):
        super().__init__()
        self.tasks = list(heads)
        self.features = features
        self.heads = nn.ModuleList(heads.values())
        self._active = 0
        self.variant = 0  # which of the method's variants this model is (AdaShare's architectures)

    def use(self, task: str) -> "MultiTaskNet":
        """Switch every per-task part to ``task``; returns self, so ``model.use(t)(x)`` works."""
        if task not in self.tasks:
            raise KeyError(f"no task {task!r}; tasks: {self.tasks}")
        self._active = self.tasks.index(task)
        for m in self.modules():
            if isinstance(m, TaskSwitch):
                m.active = self._active
        return self

    @property
    def head(self) -> nn.Module:
        """The active task's head (so code written for a ``TaskNet`` reads it alike)."""
        return self.heads[self._active]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def switches(self, kind: type) -> list[tuple[str, nn.Module]]:
        return [(p, m) for p, m in self.named_modules() if isinstance(m, kind)]

    def task_norms(self, norm_types: tuple[type, ...]) -> None:
        """Give every norm layer of the backbone one copy per task (in place)."""
        for path, m in list(self.features.named_modules()):
            if isinstance(m, norm_types) and path:
                self.features.set_submodule(path, TaskNorms(m, len(self.tasks)))

    def shared_base(self) -> TaskNet:
        """The shared backbone as a plain ``TaskNet`` (Identity head, eval mode): switches
        replaced by their shared form, parametrisations removed keeping the shared weight."""
        features = copy.deepcopy(self.features)
        for path, m in reversed(list(features.named_modules())):  # innermost first
            if path and isinstance(m, TaskSwitch) and (plain := m.shared()) is not None:
                features.set_submodule(path, plain)
        for m in features.modules():
            if parametrize.is_parametrized(m):
                _unparametrize(m)
        return TaskNet(features.requires_grad_(False), nn.Identity()).eval()


def _unparametrize(module: nn.Module) -> None:
    """Make a *copy* of a parametrised module plain again, keeping the shared (original) tensors.

    Not ``parametrize.remove_parametrizations``: a deep copy shares its generated
    ``Parametrized*`` class with the original module, and removing deletes the property from
    that class, which breaks the original."""
    originals = {name: p.original for name, p in module.parametrizations.items()}
    module.__class__ = module.__class__.__bases__[0]
    del module._modules["parametrizations"]
    for name, t in originals.items():
        module.register_parameter(name, nn.Parameter(t.detach().clone(), requires_grad=False))
