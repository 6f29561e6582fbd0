"""TAPS, one task at a time: every Conv2d and Linear gets a gated dense delta (zeros at start)
and a scalar score (0.15 at start); ``(lambda / L) * sum |s|`` pushes scores under the
threshold, so only layers that earn it become task-specific, and only those are stored (a
``Replace`` per gated-on layer plus one gate bit per candidate)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from pipeline.core.backbones import TaskNet
from pipeline.core.delta import Replace, TaskDelta
from pipeline.methods.base import IncrementalMethod
from pipeline.methods.layers import adaptable_layers, head_entry, norm_entries, parametrized_layers
from pipeline.methods.taps.gate import TapsConfig, TapsFacts, TapsGate, facts, l1_penalty


def gates(model: nn.Module) -> list[tuple[str, nn.Module, TapsGate]]:
    return parametrized_layers(model, TapsGate)


class Taps(IncrementalMethod):
    name = "taps"
    Config = TapsConfig
    Facts = TapsFacts

    def prepare(self, model: TaskNet) -> None:
        super().prepare(model)
        cfg = self.config
        for _, layer in adaptable_layers(model):
            parametrize.register_parametrization(layer, "weight", TapsGate(layer.weight, cfg.score_init, cfg.tau))
            layer.parametrizations.weight.original.requires_grad_(False)

    def group_of(self, name: str) -> str:
        return "gates" if name.endswith(".score") else "body"

    def regulariser(self, model: TaskNet, epoch: int) -> torch.Tensor | None:
        layers = gates(model)
        return l1_penalty(self.config, torch.stack([g.score for _, _, g in layers]),
                          [m.parametrizations.weight.original.numel() for _, m, _ in layers], epoch)

    def task_delta(self, model: TaskNet, task: str) -> TaskDelta:
        layers = gates(model)
        entries = {path: Replace({"weight": m.weight.detach().clone()}) for path, m, g in layers if g.is_on()}
        return TaskDelta(task, self.name, entries | norm_entries(model, self.task_statistics) | head_entry(model), gate_bits=len(layers))

    def describe(self, model: TaskNet, task: str) -> TapsFacts:
        layers = gates(model)
        return facts([(p, m) for p, m, _ in layers], [g.score.item() for _, _, g in layers],
                     [g.is_on() for _, _, g in layers])

    @classmethod
    def report(cls, label, entry, plot_dir):
        from pipeline.methods.taps.report import layer_report

        return layer_report(cls, label, entry, plot_dir)
