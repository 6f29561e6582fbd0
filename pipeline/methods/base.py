"""The small contract every method keeps, and the helpers they share.

A method (a) wraps or unfreezes the layers it adapts (``prepare``), (b) adds its
regulariser to the task loss (``regulariser``), and (c) emits a ``TaskDelta``
(``task_delta``). Training, folding, bundling and export only ever see these three.

Optional, for methods that need more than one model's view: ``setup`` receives the task's
``TrainContext`` before ``prepare`` (data and schedule for a search, earlier tasks' deltas
for a method that borrows from them), ``start_epoch`` switches training phases,
``uses_pool``/``passes`` ask the runner for earlier tasks and repeated passes, and
``bundle_deltas`` turns the versions trained into what the bundle stores.

``JointMethod`` is the same contract for methods that train every task at once on one
``MultiTaskNet`` (shared weights, per-task norms and heads): its deltas are relative to the
jointly trained shared weights, which become the bundle's base.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torch.nn.utils import parametrize

from pipeline.backbones import Backbone, TaskNet
from pipeline.data import TaskData
from pipeline.delta import Head, Norm, Replace, TaskDelta, own_tensors
from pipeline.multitask import MultiTaskNet, TaskNorms

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
ADAPTABLE_TYPES = (nn.Conv2d, nn.Linear)


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class TrainContext:
    """What one (method, task) training unit runs with, for methods that need more than the model."""

    backbone: Backbone
    data: TaskData
    schedule: Any  # pipeline.train.Schedule
    seed: int
    workdir: Path | None = None  # the unit's directory; ``workdir / "scratch"`` is removed when it finishes
    signature: str = ""
    progress: bool = False
    # every finished version of this method's earlier units, by id ("<task>@<pass>"), linked to each other
    versions: dict[str, TaskDelta] = field(default_factory=dict)
    pool: list[str] = field(default_factory=list)  # the version ids a pool method may borrow from


class Method:
    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # False: the backbone's norms keep the base statistics (eval mode while training)
    task_norms: ClassVar[bool] = True
    # True: a unit depends on the method's earlier units (the runner trains tasks in order, passes
    # their deltas in ``TrainContext.versions``, and retrains later tasks when an earlier one changes)
    uses_pool: ClassVar[bool] = False
    # True: a ``JointMethod``, trained on all tasks at once
    joint: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.Config()
        self.context: TrainContext | None = None

    @property
    def passes(self) -> int:
        """How many times the runner goes over the tasks (CWPS's multi-task mode: more than one)."""
        return 1

    def setup(self, context: TrainContext) -> None:
        """Called before ``prepare`` for every training unit."""
        self.context = context

    def start_epoch(self, model: TaskNet, epoch: int) -> None:
        """Called before every training epoch (0-based), also on resume: switch phases here."""

    def bundle_deltas(self, final: dict[str, str], versions: dict[str, TaskDelta]) -> list[TaskDelta]:
        """The deltas a bundle stores, one per task, from the version kept for each task
        (``final``: task -> version id) and every version trained."""
        return [versions[v] for v in final.values()]

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


class JointConfig(MethodConfig):
    task_weights: dict[str, float] = Field(default_factory=dict,
                                           description="loss weight per task name (default 1 for every task)")

    @field_validator("task_weights")
    @classmethod
    def _non_negative(cls, weights: dict[str, float]) -> dict[str, float]:
        bad = {t: w for t, w in weights.items() if not w >= 0}
        if bad:
            raise ValueError(f"task weights must be >= 0, got {bad}")
        return weights


@dataclass
class JointContext:
    """What one joint training unit (all tasks of a method entry) runs with."""

    backbone: Backbone
    tasks: dict[str, TaskData]
    schedule: Any  # pipeline.train.Schedule
    seed: int
    workdir: Path | None = None  # ``workdir / "scratch"`` is removed when the unit finishes
    signature: str = ""
    progress: bool = False


class JointMethod(Method):
    """A method that trains every task at once (``pipeline.train_joint``).

    ``prepare`` gets the ``MultiTaskNet`` (per-task norms already in place); every step runs
    one batch of every task, each through its own norms and head. ``task_delta(model, task)``
    is relative to ``model.shared_base()``. Optional: ``phases``/``policy_parameters`` for an
    architecture policy trained on its own split and optimiser (AdaShare), ``candidates``/
    ``select`` for several trainings of which the best mean validation is kept.
    """

    joint = True
    Config = JointConfig

    @property
    def candidates(self) -> int:
        """How many models the unit trains (AdaShare: the architectures sampled from its policy)."""
        return 1

    def setup(self, context: JointContext) -> None:  # type: ignore[override]
        self.context = context

    def select(self, candidate: int) -> None:
        """Called before ``prepare`` for every candidate, and with the one kept at the end."""

    def prepare(self, model: MultiTaskNet) -> None:  # type: ignore[override]
        model.requires_grad_(True)

    def phases(self, epoch: int) -> tuple[str, ...]:
        """The passes of an epoch: "weights" (SGD, train split) and "policy" (the policy
        optimiser on a held-apart half of the train split)."""
        return ("weights",)

    def policy_parameters(self, model: MultiTaskNet) -> list[nn.Parameter]:
        return []

    def policy_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        raise NotImplementedError(f"{self.name} has policy parameters but no policy optimiser")

    def task_weight(self, task: str) -> float:
        return float(self.config.task_weights.get(task, 1.0))

    def task_delta(self, model: MultiTaskNet, task: str) -> TaskDelta:  # type: ignore[override]
        model.use(task)
        return TaskDelta(task, self.name, joint_norm_entries(model) | head_entry(model))

    def describe(self, model: MultiTaskNet, task: str) -> dict:  # type: ignore[override]
        return {}


def joint_norm_entries(model: MultiTaskNet) -> dict[str, Norm]:
    """The active task's norms, at the paths the shared base keeps its plain norms."""
    out = {}
    for p, m in model.features.named_modules():
        if isinstance(m, TaskNorms) and (values := _snapshot(m.per_task[m.active])):
            out[f"features.{p}"] = Norm(values)
    return out


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
