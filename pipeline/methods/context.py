"""What a method is handed by the trainer that runs it: the schedule, the data, and ``fit``.

A method never imports a trainer. One that needs a training run of its own (CWPS's reference
fine-tune, AdaShare's policy search) calls ``context.fit``, which the trainer fills in with
itself, so the same checkpointing, resume and progress apply to that run too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.core.backbones import Backbone
from pipeline.core.delta import TaskDelta


@dataclass
class Schedule:
    """The optimisation settings of one training unit (the ``train`` section, with the entry's
    own ``epochs`` and ``lr`` where it sets them)."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    head_lr_scale: float = 1.0  # the new, randomly initialised head learns this much faster
    recalibrate_norms: bool = True
    lr_source: str = "train.lr"  # the config field the lr comes from, for messages that say what to change
    groups: dict[str, Any] = field(default_factory=dict)  # group -> GroupOptions the entry sets (its ``optim``)
    run_groups: dict[str, Any] = field(default_factory=dict)  # group -> GroupOptions of ``train.optim``
    validate_every: int = 1

    def validates(self, epoch: int) -> bool:
        """Is the model validated after ``epoch`` (0-based): every ``validate_every``-th, and the last."""
        return (epoch + 1) % self.validate_every == 0 or epoch + 1 == self.epochs


@dataclass
class TaskContext:
    """One incremental (method, task) unit."""

    backbone: Backbone
    data: Any  # pipeline.data.TaskData: methods hand it on (to ``fit``), never read it
    schedule: Schedule
    seed: int
    workdir: Path | None = None  # the unit's directory; ``workdir / "scratch"`` is removed when it finishes
    signature: str = ""
    progress: bool = False
    # fit(method, schedule, workdir, signature) -> outcome with ``.model`` and ``.history``: a
    # training run of another method on this task (the trainer's own loop)
    fit: Callable[..., Any] | None = None
    # pool methods: every finished version of the entry's earlier units, by id, linked to each
    # other, and the ids this unit may borrow from
    versions: dict[str, TaskDelta] = field(default_factory=dict)
    pool: list[str] = field(default_factory=list)


@dataclass
class JointContext:
    """One joint unit: every task of a method entry at once."""

    backbone: Backbone
    tasks: dict[str, Any]  # task -> pipeline.data.TaskData, handed on to ``fit``
    image_size: int
    schedule: Schedule
    seed: int
    workdir: Path | None = None  # ``workdir / "scratch"`` is removed when the unit finishes
    signature: str = ""
    progress: bool = False
    # fit(method, schedule, checkpoint, signature, desc) -> outcome: one joint training run
    fit: Callable[..., Any] | None = None
