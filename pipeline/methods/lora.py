"""LoRA (Hu et al., 2021), as HF PEFT applies it to vision backbones: the baseline users already
know, beside taskfold's methods on the same data and the same ledger.

Every Conv2d and Linear (PEFT's targets) gets ``w = w_base + (alpha / r) * B @ A``: ``A`` (r, in
x k x k) Kaiming-uniform (a = sqrt(5)), ``B`` (out, r) zeros, so training starts at the
pretrained model; the base stays frozen; norms (optional) and the head train. A grouped or
depthwise conv is left to the base: PEFT's conv LoRA only takes ranks that its group count
divides, which a depthwise conv's (one group per channel) does not at any useful rank; FTN's CP
deltas do adapt them.

It folds into the existing ``lowrank`` kind (two factors, ``(r, out)`` and ``(r, in x k x k)``),
so bundles, the ledger, merging and the side-branch form need nothing new.
"""
from __future__ import annotations

import fnmatch
import math

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from pipeline.core.backbones import TaskNet
from pipeline.core.delta import CPPart, LowRank, TaskDelta
from pipeline.methods.base import Facts, GroupOptions, IncrementalMethod, NormsConfig
from pipeline.methods.layers import ADAPTABLE_TYPES, head_entry, norm_entries, parametrized_layers


class LoraConfig(NormsConfig):
    rank: int = Field(8, ge=1, description="r (PEFT's default)")
    alpha: float = Field(8.0, gt=0, description="the delta is scaled by alpha / r (PEFT's lora_alpha, default 8)")
    layers: list[str] = Field(default_factory=lambda: ["*"], description="fnmatch patterns of module paths to adapt")
    task_norms: bool = Field(True, description="train task norms too (PEFT's modules_to_save with BatchNorm)")


class LoraFacts(Facts):
    layers: list[str]
    rank: int
    params: list[int]
    base_params: list[int]
    skipped: list[str]  # grouped or depthwise convs left to the base


class LoraAdapter(nn.Module):
    """Parametrisation ``w -> w + scale * (B @ A).reshape(w.shape)``."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        out, fan_in = weight.shape[0], weight[0].numel()
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, fan_in))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(out, rank))

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        return (self.scale * self.B @ self.A).reshape(weight.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta(weight)

    def lowrank(self) -> LowRank:
        """The delta as stored: factors (r, out) with the scale folded in, and (r, in x k x k)."""
        return LowRank([CPPart([(self.scale * self.B).t().detach().clone(), self.A.detach().clone()])])


def adapters(model: nn.Module) -> list[tuple[str, nn.Module, LoraAdapter]]:
    return parametrized_layers(model, LoraAdapter)


class Lora(IncrementalMethod):
    name = "lora"
    Config = LoraConfig
    Facts = LoraFacts

    @property
    def task_norms(self) -> bool:
        return self.config.task_norms

    def targets(self, model: TaskNet) -> tuple[list[tuple[str, nn.Module]], list[str]]:
        """(layers LoRA adapts, grouped convs it leaves to the base)."""
        chosen, skipped = [], []
        for p, m in model.features.named_modules():
            path = f"features.{p}"
            if not isinstance(m, ADAPTABLE_TYPES) or not any(fnmatch.fnmatchcase(path, pat) for pat in self.config.layers):
                continue
            if isinstance(m, nn.Conv2d) and m.groups > 1:
                skipped.append(path)
            else:
                chosen.append((path, m))
        return chosen, skipped

    def prepare(self, model: TaskNet) -> None:
        super().prepare(model)
        layers, self.skipped = self.targets(model)
        for _, layer in layers:
            parametrize.register_parametrization(layer, "weight",
                                                 LoraAdapter(layer.weight, self.config.rank, self.config.alpha))
            layer.parametrizations.weight.original.requires_grad_(False)

    def group_of(self, name: str) -> str:
        return "factors" if ".parametrizations.weight.0." in name else "body"

    def group_options(self) -> dict[str, GroupOptions]:
        """LoRA as PEFT users train it: AdamW for the factors and the norms. 1e-2 with a one-epoch
        warm-up for the factors (quickstart, r 8: 2e-3 gave 0.708 mean accuracy, 1e-2 0.8185)."""
        return {"factors": GroupOptions(optimizer="adamw", lr=1e-2, weight_decay=0.0, warmup_epochs=1),
                "norms": GroupOptions(optimizer="adamw", lr=2e-3, weight_decay=0.0, warmup_epochs=1)}

    def task_delta(self, model: TaskNet, task: str) -> TaskDelta:
        entries = {path: a.lowrank() for path, _, a in adapters(model)}
        norms = norm_entries(model, self.task_statistics) if self.task_norms else {}
        return TaskDelta(task, self.name, entries | norms | head_entry(model))

    def describe(self, model: TaskNet, task: str) -> LoraFacts:
        layers = adapters(model)
        return LoraFacts(layers=[p for p, _, _ in layers], rank=self.config.rank,
                         params=[a.A.numel() + a.B.numel() for _, _, a in layers],
                         base_params=[m.parametrizations.weight.original.numel() for _, m, _ in layers],
                         skipped=list(getattr(self, "skipped", [])))
