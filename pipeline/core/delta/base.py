"""What every delta kind knows: how to merge into a base module, what it costs, how it is stored.

* ``apply(module)``: merge into a plain module of the base architecture and return the module
  to put at that path;
* ``params()`` / ``bits()``: its storage cost (float bits by storage dtype);
* ``tensors()`` / ``from_tensors()``: its safetensors form; ``attrs()``: small JSON facts that
  are not tensors (a row range, a layout), kept in the file's metadata (``codec``).

A kind that points into *other* tasks' deltas (channel-select borrows rows) names them in
``references()`` and is ``link``ed to them after loading; whoever loads a delta (the bundle,
the training pool) does the linking.
"""
from __future__ import annotations

from typing import ClassVar, Mapping

import torch
from torch import nn


def tensor_bits(t: torch.Tensor) -> int:
    if t.dtype == torch.bool:
        return t.numel()
    return t.numel() * t.element_size() * 8


def own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's own parameters and buffers (not its children's): what an overlay replaces."""
    return dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))


class Delta:
    kind: ClassVar[str]

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def attrs(self) -> dict:
        """JSON-able facts needed to rebuild the delta besides its tensors."""
        return {}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], attrs: dict | None = None) -> "Delta":
        raise NotImplementedError

    def apply(self, module: nn.Module) -> nn.Module:
        raise NotImplementedError

    def validate(self, module: nn.Module) -> None:
        """Raise ValueError if this entry does not fit ``module`` of the base (a delta for another
        backbone, a tampered file). Default: merge into a copy; kinds override with shape checks."""
        import copy

        self.apply(copy.deepcopy(module))

    def covers(self) -> list[str]:
        """Names of the module's base tensors this delta makes unnecessary (ledger use)."""
        return []

    def overlay(self, module: nn.Module) -> dict[str, torch.Tensor] | None:
        """Tensors to run ``module`` with for this task, computed from the shared base module
        without changing it (shared-plus-delta form). None: the kind replaces the module."""
        return None

    def branch(self, module: nn.Module) -> nn.Module | None:
        """A module that computes this task's output from the *unchanged* base ``module`` plus a
        small side computation (a low-rank branch), so the base weights stay shared in a
        deployed graph. None: no such form; the exporter merges the delta instead."""
        return None

    def references(self) -> set[str]:
        """Names of other deltas (tasks, pool versions) this entry reads rows from."""
        return set()

    def link(self, entries: Mapping[str, "Delta"]) -> None:
        """Give the entry the same-path entries of the deltas it ``references``."""

    def params(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def bits(self) -> int:
        return sum(tensor_bits(t) for t in self.tensors().values())
