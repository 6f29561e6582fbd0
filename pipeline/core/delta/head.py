"""The task's classifier (``head``): its shape follows the task, so it replaces the module."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.core.delta.base import Delta


@dataclass
class Head(Delta):
    """The task's classifier. Its shape follows the task, so it replaces the module."""

    kind = "head"
    weight: torch.Tensor
    bias: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], attrs: dict | None = None) -> "Head":
        return cls(tensors["weight"], tensors["bias"])

    def validate(self, module: nn.Module) -> None:
        if self.weight.dim() != 2 or self.bias.shape != (self.weight.shape[0],):
            raise ValueError(f"head: weight {tuple(self.weight.shape)} and bias {tuple(self.bias.shape)} are not a "
                             "classifier (classes x features, classes)")

    def apply(self, module: nn.Module) -> nn.Module:
        head = nn.Linear(self.weight.shape[1], self.weight.shape[0])
        with torch.no_grad():
            head.weight.copy_(self.weight)
            head.bias.copy_(self.bias)
        return head
