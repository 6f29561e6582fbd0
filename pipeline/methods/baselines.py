"""The baselines every paper compares against: fine-tune, linear probe, norms + head, and the
joint fine-tune of the multi-task setting."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.core.backbones import TaskNet
from pipeline.core.delta import TaskDelta
from pipeline.methods.base import GroupOptions, IncrementalMethod, JointMethod, NormsConfig
from pipeline.methods.layers import all_tensor_entries, head_entry, norm_entries


class FineTune(IncrementalMethod):
    """The paragon: every weight is task-specific."""

    name = "finetune"

    def prepare(self, model: TaskNet) -> None:
        model.requires_grad_(True)

    def task_delta(self, model: TaskNet, task: str) -> TaskDelta:
        return TaskDelta(task, self.name, all_tensor_entries(model) | norm_entries(model) | head_entry(model))


class LinearProbe(IncrementalMethod):
    """The feature-extractor baseline: a frozen backbone (base statistics too), a new head."""

    name = "linear_probe"
    task_norms = False

    def task_delta(self, model: TaskNet, task: str) -> TaskDelta:
        return TaskDelta(task, self.name, head_entry(model))


class NormHeadConfig(NormsConfig):
    norm_stats: Literal["task", "base"] = Field(
        "base", description="base (default): the pretrained statistics stay, the affine parameters train "
                            "(quickstart mean accuracy 0.7935); task: batch statistics in training, "
                            "re-estimated on the task (the papers' BN+FC; 0.6725 in 64 steps of batch 64)")


class NormHead(IncrementalMethod):
    """The papers' "FC and BN only": task norms and head, shared weights frozen."""

    name = "norm_head"
    Config = NormHeadConfig

    def group_options(self) -> dict[str, GroupOptions]:
        """The norms under Adam at 1e-3 after a one-epoch warm-up: SGD at the entry's lr
        barely moves a scale in a short schedule, and a large step on one shifts a whole layer."""
        return {"norms": GroupOptions(optimizer="adam", lr=1e-3, warmup_epochs=1)}

    def task_delta(self, model: TaskNet, task: str) -> TaskDelta:
        return TaskDelta(task, self.name, norm_entries(model, self.task_statistics) | head_entry(model))


class JointFineTune(JointMethod):
    """The joint baseline (the papers' "multi-task" / "joint fine-tune"): one backbone trained
    on every task at once; per task only norms and head. The shared weights are the base."""

    name = "joint_finetune"
