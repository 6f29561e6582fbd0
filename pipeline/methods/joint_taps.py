"""Joint TAPS (Wallingford et al., CVPR 2022, Eq. 4): the shared weights are trained together
with every task's gated deltas, ``w_k = w_shared + I(s_k >= tau) dw_k`` per Conv2d/Linear.

Each task has its own delta and score per layer (``JointTapsGate``, switched by the active
task); the L1 term sums every task's scores. After training the shared weights are the
bundle's base and each task stores its gated-on layers, as incremental TAPS does. The
paper's memory-efficient variant (a joint base, then incremental TAPS from it) needs no
code of its own: ``{name: taps, base: <joint entry>}``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from pipeline.delta import Replace, TaskDelta
from pipeline.methods import register
from pipeline.methods.base import (JointConfig, JointMethod, adaptable_layers, head_entry, joint_norm_entries,
                                   parametrized_layers)
from pipeline.methods.taps import TapsConfig, straight_through_gate
from pipeline.multitask import MultiTaskNet, TaskSwitch


class JointTapsConfig(TapsConfig, JointConfig):
    pass


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


def gates(model: nn.Module) -> list[tuple[str, nn.Module, JointTapsGate]]:
    return parametrized_layers(model, JointTapsGate)


@register
class JointTaps(JointMethod):
    name = "joint_taps"
    Config = JointTapsConfig

    def prepare(self, model: MultiTaskNet) -> None:
        super().prepare(model)  # shared weights train too: that is the joint setting
        cfg = self.config
        for _, layer in adaptable_layers(model):
            parametrize.register_parametrization(
                layer, "weight", JointTapsGate(layer.weight, len(model.tasks), cfg.score_init, cfg.tau))

    def regulariser(self, model: MultiTaskNet, epoch: int) -> torch.Tensor | None:
        if self.config.lam == 0 or epoch < self.config.l1_warmup_epochs:
            return None
        layers = gates(model)
        scores = torch.stack([g.scores for _, _, g in layers])  # (L, K)
        return self.config.lam / len(layers) * scores.abs().sum()

    def task_delta(self, model: MultiTaskNet, task: str) -> TaskDelta:
        model.use(task)
        k = model.tasks.index(task)
        layers = gates(model)
        entries = {path: Replace({"weight": m.weight.detach().clone()}) for path, m, g in layers if g.is_on(k)}
        return TaskDelta(task, self.name, entries | joint_norm_entries(model) | head_entry(model),
                         gate_bits=len(layers))

    def describe(self, model: MultiTaskNet, task: str) -> dict:
        k = model.tasks.index(task)
        layers = gates(model)
        return {
            "layers": [p for p, _, _ in layers],
            "params": [m.parametrizations.weight.original.numel() for _, m, _ in layers],
            "scores": [round(g.scores[k].item(), 5) for _, _, g in layers],
            "gated_on": [g.is_on(k) for _, _, g in layers],
        }
