"""AdaShare's skipped block (``skip``): the block is not executed, so it leaves the graph."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.core.delta.base import Delta


@dataclass
class Skip(Delta):
    """AdaShare: the task does not execute this residual block, so its merged model has the
    block removed from the graph (``x -> x``): fewer FLOPs, not merely zeroed weights.

    Stores no tensor; the decision itself is counted as a gate bit of the ``TaskDelta``.
    ``tensors_of_block`` names the block's tensors (relative to it), so the ledger knows
    which base tensors a task no longer needs."""

    kind = "skip"
    tensors_of_block: list[str] = field(default_factory=list)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def attrs(self) -> dict:
        return {"covers": list(self.tensors_of_block)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], attrs: dict | None = None) -> "Skip":
        return cls(list((attrs or {}).get("covers", [])))

    def covers(self) -> list[str]:
        return list(self.tensors_of_block)

    def validate(self, module: nn.Module) -> None:
        names = set(module.state_dict())
        if unknown := [n for n in self.tensors_of_block if n not in names]:
            raise KeyError(f"skip covers tensors {unknown[:3]} that block {type(module).__name__} does not have")

    def apply(self, module: nn.Module) -> nn.Module:
        return nn.Identity()

    @classmethod
    def of(cls, block: nn.Module) -> "Skip":
        return cls([k for k, v in block.state_dict().items() if v.is_floating_point()])
