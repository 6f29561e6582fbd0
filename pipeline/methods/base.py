"""The contracts every method keeps, and the one it picks a trainer by.

A method (a) wraps or unfreezes the layers it adapts (``prepare``), (b) adds its regulariser
to the task loss (``regulariser``), and (c) emits a ``TaskDelta`` (``task_delta``). Training,
folding, bundling and export only ever see these three, plus two things for the report: a
typed ``Facts`` record per trained task (``describe``) and the method's own report section.

``trainer`` names the loop a method needs:

* ``incremental`` (``IncrementalMethod``): one task at a time on a ``TaskNet``;
* ``pool`` (``PoolMethod``): incremental, but a unit borrows from the entry's earlier units
  (the pool) and the tasks may be trained over several passes;
* ``joint`` (``JointMethod``): every task at once on a ``MultiTaskNet``; its deltas are
  relative to the jointly trained shared weights, which become the bundle's base.

Parameters are handed to the optimiser in named groups (``param_groups``): ``head``, ``norms``,
``body`` (dense or task weights), ``factors``, ``gates``, ``policy``. Each group's optimiser
settings are data (``group_options``), so one trainer serves every method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from pipeline.core.backbones import TaskNet
from pipeline.core.delta import TaskDelta
from pipeline.methods.context import JointContext, TaskContext
from pipeline.methods.layers import NORM_TYPES, head_entry, joint_norm_entries, set_trainable
from pipeline.methods.multitask import MultiTaskNet

TrainerKind = Literal["incremental", "pool", "joint"]
GROUPS = ("head", "norms", "body", "factors", "gates", "policy")


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NormsConfig(MethodConfig):
    """For methods with task norms: whose BatchNorm statistics they use."""

    norm_stats: Literal["task", "base"] = Field(
        "task", description="task: BatchNorm trains on batch statistics and its running statistics are re-estimated "
                            "on the task (stored); base: the pretrained statistics stay (eval mode), only the affine "
                            "parameters train and are stored")


class Facts(BaseModel):
    """What a method tells the report about one trained task; stored as ``describe`` in the
    unit's result.json and read back with ``Method.Facts.model_validate``."""

    model_config = ConfigDict(extra="forbid")


class GroupOptions(BaseModel):
    """Optimiser settings of one parameter group; a field left out inherits (the ``train``
    section, then the method's defaults, then the entry's ``optim``). ``lr`` wins over
    ``lr_scale`` (x the entry's lr). ``warmup_epochs``: a linear ramp of the group's lr before
    the cosine decay; ``clip``: the group's gradient norm is clipped to it; a group with another
    ``phase`` than ``weights`` trains in its own pass on its own split (AdaShare's policy)."""

    model_config = ConfigDict(extra="forbid")

    optimizer: Literal["sgd", "adam", "adamw"] | None = None
    lr: float | None = Field(None, gt=0)
    lr_scale: float | None = Field(None, gt=0)
    momentum: float | None = Field(None, ge=0, lt=1)
    weight_decay: float | None = Field(None, ge=0)
    warmup_epochs: float | None = Field(None, ge=0)
    clip: float | None = Field(None, gt=0)
    phase: Literal["weights", "policy"] | None = None

    def over(self, other: "GroupOptions | None") -> "GroupOptions":
        """These options with every field ``other`` sets replaced by ``other``'s. Another
        optimiser without its own ``lr`` drops the inherited ``lr`` (an Adam lr means nothing to
        SGD), so the group falls back to ``lr_scale`` x the entry's lr."""
        if other is None:
            return self
        update = {k: getattr(other, k) for k in other.model_fields_set}
        if "optimizer" in update and update["optimizer"] != self.optimizer and "lr" not in update:
            update["lr"] = None
        return self.model_copy(update=update)


def known_groups(optim: dict[str, "GroupOptions"]) -> dict[str, "GroupOptions"]:
    """``optim`` if every key names a parameter group (a config validator's check)."""
    if unknown := sorted(set(optim) - set(GROUPS)):
        raise ValueError(f"unknown parameter group(s) {unknown}; groups: {list(GROUPS)}")
    return optim


@dataclass
class ReportSection:
    """A method's part of report.md: markdown lines, and plots written (title -> relative path)."""

    lines: list[str] = field(default_factory=list)
    plots: dict[str, str] = field(default_factory=dict)


class Method:
    name: ClassVar[str]
    trainer: ClassVar[TrainerKind]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    Facts: ClassVar[type[Facts]] = Facts
    # False: the backbone's norms keep the base statistics (eval mode while training)
    task_norms: ClassVar[bool] = True

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.Config()
        self.context: Any = None

    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        """Called before every training epoch (0-based), also on resume: switch phases here."""

    def regulariser(self, model: nn.Module, epoch: int) -> torch.Tensor | None:
        return None

    @property
    def task_statistics(self) -> bool:
        """Do the task's own BatchNorm statistics replace the base's (train-mode norms, re-estimated)?"""
        return self.task_norms and getattr(self.config, "norm_stats", "task") == "task"

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        if not self.task_statistics:
            for m in model.features.modules():
                if isinstance(m, NORM_TYPES):
                    m.eval()

    def param_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by group name (``GROUPS``), in model order: the head(s), the
        norms, and the rest as ``group_of`` names them."""
        heads = {id(p) for p in (model.heads if isinstance(model, MultiTaskNet) else model.head).parameters()}
        norms = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
        out: dict[str, list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                group = "head" if id(p) in heads else "norms" if id(p) in norms else self.group_of(name)
                out.setdefault(group, []).append(p)
        return out

    def group_of(self, name: str) -> str:
        """The group of a trainable parameter that is neither head nor norm, by its name."""
        return "body"

    def group_options(self) -> dict[str, GroupOptions]:
        """Per-group optimiser settings that differ from plain SGD at the entry's lr (the head's
        lr scale comes from the ``train`` section)."""
        return {}

    def task_delta(self, model: nn.Module, task: str) -> TaskDelta:
        raise NotImplementedError

    def describe(self, model: nn.Module, task: str) -> Facts:
        """Method-specific facts for the report (e.g. which layers became task-specific)."""
        return self.Facts()

    # ---------------------------------------------------------------- report (reads results only)

    @classmethod
    def summarise(cls, entry: dict) -> dict:
        """Extra keys for the entry in results.json, computed from its tasks' results."""
        return {}

    @classmethod
    def report(cls, label: str, entry: dict, plot_dir: Path) -> ReportSection:
        """The method's own part of the report for one entry of results.json."""
        return ReportSection()

    @classmethod
    def facts(cls, entry: dict) -> dict[str, Facts]:
        """Every task's typed facts from an entry of results.json."""
        return {t: cls.Facts.model_validate(r["describe"]) for t, r in entry["tasks"].items()}


class IncrementalMethod(Method):
    """One task at a time: ``setup`` gets the unit's ``TaskContext``, then ``prepare`` the model."""

    trainer = "incremental"

    def setup(self, context: TaskContext) -> None:
        """Called before ``prepare`` for every training unit."""
        self.context = context

    def prepare(self, model: TaskNet) -> None:
        """Freeze what is shared, make trainable (or wrap) what is task-specific. In place."""
        set_trainable(model, norms=self.task_norms)


class PoolMethod(IncrementalMethod):
    """Incremental, but a unit borrows from the versions the entry trained before it
    (``TaskContext.versions``/``pool``), possibly over several passes over the tasks."""

    trainer = "pool"

    @property
    def passes(self) -> int:
        """How many times the tasks are trained in turn."""
        return 1

    def bundle_deltas(self, final: dict[str, str], versions: dict[str, TaskDelta]) -> list[TaskDelta]:
        """The deltas a bundle stores, one per task, from the version kept for each task
        (``final``: task -> version id) and every version trained."""
        return [versions[v] for v in final.values()]


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


class JointMethod(Method):
    """Every task at once (``pipeline.training.joint``).

    ``prepare`` gets the ``MultiTaskNet`` (per-task norms already in place); every step runs one
    batch of every task, each through its own norms and head. ``task_delta(model, task)`` is
    relative to ``model.shared_base()``. A method may train several variants (AdaShare: the
    architectures sampled from its policy): ``variants()`` says how many after ``setup``, each is
    trained from scratch with ``prepare(model, variant)``, and the best mean validation is kept.
    Groups of another phase (``policy``) train in their own pass on a held-apart half of the
    train split.
    """

    trainer = "joint"
    Config = JointConfig

    def setup(self, context: JointContext) -> None:
        self.context = context

    def variants(self) -> int:
        return 1

    def prepare(self, model: MultiTaskNet, variant: int = 0) -> None:
        model.requires_grad_(True)

    def phases(self, epoch: int) -> tuple[str, ...]:
        """The passes of an epoch: "weights" (train split) and "policy" (the other half)."""
        return ("weights",)

    def task_weight(self, task: str) -> float:
        return float(self.config.task_weights.get(task, 1.0))

    def task_delta(self, model: MultiTaskNet, task: str) -> TaskDelta:
        model.use(task)
        return TaskDelta(task, self.name, joint_norm_entries(model) | head_entry(model))
