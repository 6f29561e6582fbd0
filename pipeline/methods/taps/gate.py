"""TAPS's gated delta (Wallingford et al., CVPR 2022, Eq. 1-4), for one task or for K at once.

``w = w_base + I(s >= tau) * dw`` with a straight-through indicator: forward exactly 0 or 1,
backward the gradient of ``s * dw``. Implemented as ``torch.nn.utils.parametrize``
parametrisations of ``weight``, so a layer keeps its own class and forward.
"""
from __future__ import annotations

import torch
from typing import Literal

from pydantic import Field
from torch import nn

from pipeline.methods.base import Facts, NormsConfig
from pipeline.methods.multitask import TaskSwitch


class TapsConfig(NormsConfig):
    lam: float = Field(1.0, ge=0, description="L1 weight on the gate scores (the paper's lambda)")
    tau: float = Field(0.1, description="gate threshold")
    score_init: float = Field(0.15, description="initial score (above tau: every layer starts gated on)")
    l1_warmup_epochs: int = Field(1, ge=0, description="epochs before the L1 term is switched on")
    penalty: Literal["uniform", "params"] = Field(
        "params", description="params (default): each score weighs its layer's share of the parameters (x L), "
                              "so lam prices storage (quickstart, lam 2: 0.805 at 1.86x; lam 1: 0.807 at 2.16x); "
                              "uniform: every layer weighs the same, the paper's (lam 1: 0.805 at 3.99x, lam 3: "
                              "0.679 at 1.76x)")


class TapsFacts(Facts):
    layers: list[str]
    params: list[int]  # base values of each candidate layer
    scores: list[float]
    gated_on: list[bool]


def straight_through_gate(score: torch.Tensor, tau: float) -> torch.Tensor:
    """``I(score >= tau)`` forward, the gradient of ``score`` backward. Exactly 0 or 1: written
    ``hard + (s - s.detach())``, as ``(hard + s) - s`` is not exactly 1 in float32."""
    hard = (score >= tau).to(score.dtype)
    return hard + (score - score.detach())


class TapsGate(nn.Module):
    """Parametrisation ``w -> w + I(s >= tau) * dw`` with a straight-through indicator."""

    def __init__(self, weight: torch.Tensor, score_init: float, tau: float):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros_like(weight))
        self.score = nn.Parameter(torch.tensor(float(score_init)))
        self.tau = tau

    def is_on(self) -> bool:
        return bool(self.score.detach() >= self.tau)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + straight_through_gate(self.score, self.tau) * self.delta


class JointTapsGate(nn.Module, TaskSwitch):
    """``w -> w + I(s_k >= tau) dw_k`` for the active task k; straight-through as in TAPS."""

    def __init__(self, weight: torch.Tensor, num_tasks: int, score_init: float, tau: float):
        super().__init__()
        self.deltas = nn.ParameterList(nn.Parameter(torch.zeros_like(weight)) for _ in range(num_tasks))
        self.scores = nn.Parameter(torch.full((num_tasks,), float(score_init)))
        self.tau = tau

    def is_on(self, task: int) -> bool:
        return bool(self.scores[task].detach() >= self.tau)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + straight_through_gate(self.scores[self.active], self.tau) * self.deltas[self.active]


def l1_penalty(config: TapsConfig, scores: torch.Tensor, sizes: list[int], epoch: int) -> torch.Tensor | None:
    """``(lam / L) sum_i w_i |s_i|`` once the warm-up is over (``scores``: every layer's, first
    dimension the L layers, then tasks; ``sizes``: each layer's parameter count). ``w_i`` is 1
    (uniform) or ``L n_i / sum n`` (params): a layer costs what it would store."""
    if config.lam == 0 or epoch < config.l1_warmup_epochs:
        return None
    layers = len(sizes)
    abs_scores = scores.abs().reshape(layers, -1)
    if config.penalty == "params":
        n = torch.tensor(sizes, dtype=scores.dtype, device=scores.device)
        abs_scores = abs_scores * (layers * n / n.sum())[:, None]
    return config.lam / layers * abs_scores.sum()


def facts(layers: list[tuple[str, nn.Module]], scores: list[float], on: list[bool]) -> TapsFacts:
    return TapsFacts(layers=[p for p, _ in layers], params=[m.parametrizations.weight.original.numel() for _, m in layers],
                     scores=[round(s, 5) for s in scores], gated_on=on)
