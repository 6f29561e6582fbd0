"""CWPS's per-output-channel mix of a task's own row and its composite parent's row, and the
settings that steer it."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from pipeline.methods.base import Facts, NormsConfig
from pipeline.methods.layers import parametrized_layers


class CwpsConfig(NormsConfig):
    lam: float = Field(0.5, ge=0, le=1, description="hard-mask threshold: a channel stays own when sigmoid(s) >= lam "
                                                    "(0: every channel own, fine-tune; 1: every channel the parent's)")
    distance: Literal["l2", "cosine"] = Field("l2", description="kernel distance of the parent search")
    search_fraction: float = Field(0.25, gt=0, le=1, description="reference fine-tune length, as a share of the epochs")
    soft_fraction: float = Field(0.5, ge=0, lt=1, description="share of the epochs with the soft mask; the rest "
                                                               "(at least one epoch) use the hard mask")
    passes: int = Field(1, ge=1, description="1: incremental (each task borrows from the earlier ones); more: the "
                                             "multi-task mode, passing over all tasks this many times")
    layers: list[str] = Field(default_factory=lambda: ["*"], description="fnmatch patterns of module paths to share")


class CwpsFacts(Facts):
    layers: list[str]
    channels: list[int]
    own_channels: list[int]
    borrowed: dict[str, int]  # shared channels by the version id (or "base") that owns the row
    pool: list[str]
    search_epochs: int | None = None
    reference_seconds: float | None = None
    reference_val_acc: float | None = None
    parent_search_seconds: float | None = None


def kernel_distance(reference: torch.Tensor, candidates: torch.Tensor, kind: str) -> torch.Tensor:
    """Distance of each output channel's kernel of ``reference`` (C, ...) to the same channel
    of every candidate (S, C, ...): shape (S, C)."""
    ref = reference.reshape(1, reference.shape[0], -1)
    cand = candidates.reshape(candidates.shape[0], candidates.shape[1], -1)
    if kind == "l2":
        return (cand - ref).norm(dim=-1)
    return 1 - torch.nn.functional.cosine_similarity(cand, ref.expand_as(cand), dim=-1, eps=1e-12)


class ChannelGate(nn.Module):
    """Per-output-channel scores and the mask they give in the current stage."""

    def __init__(self, scores: torch.Tensor, lam: float):
        super().__init__()
        self.score = nn.Parameter(scores.clone())
        self.threshold = float(torch.logit(torch.tensor(float(lam), dtype=torch.float64)))  # -inf at 0, +inf at 1
        self.register_buffer("hard", torch.tensor(False))  # the stage, checkpointed with the model

    def hard_mask(self) -> torch.Tensor:
        return self.score.detach() >= self.threshold

    def forward(self) -> torch.Tensor:
        soft = torch.sigmoid(self.score)
        if not self.hard:
            return soft
        return self.hard_mask().to(soft.dtype) + (soft - soft.detach())  # exactly 0 or 1 forward


class ChannelMix(nn.Module):
    """Parametrisation ``child -> m * child + (1 - m) * parent``, m per output channel (dim 0)."""

    def __init__(self, parent: torch.Tensor, gate: ChannelGate, owners: list[str]):
        super().__init__()
        self.register_buffer("parent", parent.detach().clone().contiguous())
        self.gate = gate
        self.owners = owners  # who owns each parent row (a version id or "base")

    def forward(self, child: torch.Tensor) -> torch.Tensor:
        m = self.gate().reshape(-1, *([1] * (child.dim() - 1))).to(child.dtype)
        return m * child + (1 - m) * self.parent


def mixed_layers(model: nn.Module) -> list[tuple[str, nn.Module, ChannelMix]]:
    return parametrized_layers(model, ChannelMix)
