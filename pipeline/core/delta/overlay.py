"""Kinds that replace some of a module's own tensors with task values of the same shapes:
a dense task weight (``replace``) and task normalisation (``norm``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.core.delta.base import Delta, own_tensors


@dataclass
class _Overlay(Delta):
    """Task values for some of a module's own tensors (parameters or buffers), same shapes."""

    values: dict[str, torch.Tensor]

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.values)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], attrs: dict | None = None) -> "_Overlay":
        return cls(dict(tensors))

    def covers(self) -> list[str]:
        return list(self.values)

    def overlay(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return dict(self.values)

    def validate(self, module: nn.Module) -> None:
        own = own_tensors(module)
        for name, value in self.values.items():
            if name not in own:
                raise KeyError(f"{type(module).__name__} has no tensor {name!r} to replace")
            if own[name].shape != value.shape:
                raise ValueError(
                    f"{type(module).__name__}.{name}: task tensor shape {tuple(value.shape)} "
                    f"!= base shape {tuple(own[name].shape)}"
                )

    def apply(self, module: nn.Module) -> nn.Module:
        self.validate(module)
        own = own_tensors(module)
        with torch.no_grad():
            for name, value in self.values.items():
                own[name].copy_(value)
        return module


class Replace(_Overlay):
    """A dense task weight (TAPS gate on, full fine-tune): the layer's tensors, replaced."""

    kind = "replace"


class Norm(_Overlay):
    """Task normalisation: affine parameters and running statistics."""

    kind = "norm"
