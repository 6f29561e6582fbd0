"""Joint TAPS (the TAPS paper's Eq. 4): the shared weights are trained together with every
task's gated deltas, ``w_k = w_shared + I(s_k >= tau) dw_k`` per Conv2d/Linear.

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

from pipeline.core.delta import Replace, TaskDelta
from pipeline.methods.base import JointConfig, JointMethod
from pipeline.methods.layers import adaptable_layers, head_entry, joint_norm_entries, parametrized_layers
from pipeline.methods.multitask import MultiTaskNet
from pipeline.methods.taps.gate import JointTapsGate, TapsConfig, TapsFacts, facts, l1_penalty


class JointTapsConfig(TapsConfig, JointConfig):
    pass


def joint_gates(model: nn.Module) -> list[tuple[str, nn.Module, JointTapsGate]]:
    return parametrized_layers(model, JointTapsGate)


class JointTaps(JointMethod):
    name = "joint_taps"
    Config = JointTapsConfig
    Facts = TapsFacts

    def prepare(self, model: MultiTaskNet, variant: int = 0) -> None:
        super().prepare(model, variant)  # shared weights train too: that is the joint setting
        cfg = self.config
        for _, layer in adaptable_layers(model):
            parametrize.register_parametrization(
                layer, "weight", JointTapsGate(layer.weight, len(model.tasks), cfg.score_init, cfg.tau))

    def group_of(self, name: str) -> str:
        return "gates" if name.endswith(".scores") else "body"

    def regulariser(self, model: MultiTaskNet, epoch: int) -> torch.Tensor | None:
        layers = joint_gates(model)
        return l1_penalty(self.config, torch.stack([g.scores for _, _, g in layers]),
                          [m.parametrizations.weight.original.numel() for _, m, _ in layers], epoch)

    def task_delta(self, model: MultiTaskNet, task: str) -> TaskDelta:
        model.use(task)
        k = model.tasks.index(task)
        layers = joint_gates(model)
        entries = {path: Replace({"weight": m.weight.detach().clone()}) for path, m, g in layers if g.is_on(k)}
        return TaskDelta(task, self.name, entries | joint_norm_entries(model) | head_entry(model),
                         gate_bits=len(layers))

    def describe(self, model: MultiTaskNet, task: str) -> TapsFacts:
        k = model.tasks.index(task)
        layers = joint_gates(model)
        return facts([(p, m) for p, m, _ in layers], [g.scores[k].item() for _, _, g in layers],
                     [g.is_on(k) for _, _, g in layers])

    @classmethod
    def report(cls, label, entry, plot_dir):
        from pipeline.methods.taps.report import layer_report

        return layer_report(cls, label, entry, plot_dir)
