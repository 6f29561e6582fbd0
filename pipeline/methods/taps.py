"""TAPS: task-adaptive parameter sharing (Wallingford et al., CVPR 2022, Eq. 1-3).

Every Conv2d and Linear of the backbone gets ``w = w_base + I(s >= tau) * dw``: a dense
delta ``dw`` (zeros at start) and a scalar score ``s`` (0.15 at start). The indicator is
straight-through: its backward is that of ``s * dw``. ``(lambda / L) * sum |s|`` pushes
scores under the threshold, so only layers that earn it become task-specific, and only
those are stored (a ``Replace`` per gated-on layer plus one gate bit per candidate).

Implemented as a ``torch.nn.utils.parametrize`` parametrisation of ``weight``, so the
layer keeps its own class and forward (padding modes, timm's same-padding convs).
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from pipeline.backbones import TaskNet
from pipeline.delta import Replace, TaskDelta
from pipeline.methods import register
from pipeline.methods.base import (Method, MethodConfig, adaptable_layers, head_entry, norm_entries,
                                   parametrized_layers)


class TapsConfig(MethodConfig):
    lam: float = Field(1.0, ge=0, description="L1 weight on the gate scores (the paper's lambda)")
    tau: float = Field(0.1, description="gate threshold")
    score_init: float = Field(0.15, description="initial score (above tau: every layer starts gated on)")
    l1_warmup_epochs: int = Field(1, ge=0, description="epochs before the L1 term is switched on")


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

    def gate(self) -> torch.Tensor:
        return straight_through_gate(self.score, self.tau)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.gate() * self.delta


def gates(model: TaskNet) -> list[tuple[str, nn.Module, TapsGate]]:
    return parametrized_layers(model, TapsGate)


@register
class Taps(Method):
    name = "taps"
    Config = TapsConfig

    def prepare(self, model: TaskNet) -> None:
        super().prepare(model)
        cfg = self.config
        for _, layer in adaptable_layers(model):
            parametrize.register_parametrization(layer, "weight", TapsGate(layer.weight, cfg.score_init, cfg.tau))
            layer.parametrizations.weight.original.requires_grad_(False)

    def regulariser(self, model: TaskNet, epoch: int) -> torch.Tensor | None:
        if self.config.lam == 0 or epoch < self.config.l1_warmup_epochs:
            return None
        scores = torch.stack([g.score for _, _, g in gates(model)])
        return self.config.lam / len(scores) * scores.abs().sum()

    def task_delta(self, model: TaskNet, task: str) -> TaskDelta:
        layers = gates(model)
        entries = {path: Replace({"weight": m.weight.detach().clone()}) for path, m, g in layers if g.is_on()}
        return TaskDelta(task, self.name, entries | norm_entries(model) | head_entry(model), gate_bits=len(layers))

    def describe(self, model: TaskNet) -> dict:
        layers = gates(model)
        return {
            "layers": [p for p, _, _ in layers],
            "params": [m.parametrizations.weight.original.numel() for _, m, _ in layers],
            "scores": [round(g.score.item(), 5) for _, _, g in layers],
            "gated_on": [g.is_on() for _, _, g in layers],
        }
