"""CWPS's per-output-channel selection (``channel_select``): own rows, or pointers to the rows
of the base or of other tasks that own them."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from pipeline.core.delta.base import Delta, own_tensors, tensor_bits


BASE_SOURCE = "base"


@dataclass
class ChannelSelect(Delta):
    """CWPS: per output channel of a layer, the task's own row or a pointer to the same channel
    of a source, ``base`` (the pretrained weights) or another delta that owns that row.

    ``mask[c]`` is True for an own row; own rows are stored in channel order in ``rows`` (and
    ``bias`` when the layer has one). For the i-th shared channel, ``source[i]`` indexes
    ``sources``. Pointers always name the row's *owner* (never a delta that itself borrowed
    it), so resolving is one lookup. Storage: 1 bit per mask entry, the own rows at their
    dtype, ceil(log2(len(sources))) bits per pointer."""

    kind = "channel_select"
    mask: torch.Tensor
    rows: torch.Tensor
    source: torch.Tensor
    sources: list[str]
    bias: torch.Tensor | None = None
    linked: dict[str, "ChannelSelect"] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if not self.sources or self.sources[0] != BASE_SOURCE:
            raise ValueError(f"channel_select: sources must start with {BASE_SOURCE!r}, got {self.sources}")
        own, shared = int(self.mask.sum()), int((~self.mask).sum())
        if self.rows.shape[0] != own or self.source.numel() != shared:
            raise ValueError(f"channel_select: mask has {own} own / {shared} shared channels but {self.rows.shape[0]} "
                             f"rows and {self.source.numel()} pointers")
        if shared and int(self.source.max()) >= len(self.sources):
            raise ValueError(f"channel_select: pointer {int(self.source.max())} past the {len(self.sources)} sources")

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"mask": self.mask, "rows": self.rows, "source": self.source}
        return out | ({"bias": self.bias} if self.bias is not None else {})

    def attrs(self) -> dict:
        return {"sources": list(self.sources)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], attrs: dict | None = None) -> "ChannelSelect":
        if not attrs or "sources" not in attrs:
            raise ValueError("a channel_select entry needs attrs.sources (what its pointers name)")
        return cls(tensors["mask"].bool(), tensors["rows"], tensors["source"], list(attrs["sources"]),
                   tensors.get("bias"))

    def pointer_bits(self) -> int:
        return math.ceil(math.log2(len(self.sources))) if len(self.sources) > 1 else 0

    def params(self) -> int:
        return self.rows.numel() + (self.bias.numel() if self.bias is not None else 0)

    def bits(self) -> int:
        own = tensor_bits(self.rows) + (tensor_bits(self.bias) if self.bias is not None else 0)
        return self.mask.numel() + own + self.source.numel() * self.pointer_bits()

    def pointers(self) -> list[str]:
        """The source name of every shared channel, in channel order."""
        return [self.sources[i] for i in self.source.tolist()]

    def references(self) -> set[str]:
        return set(self.pointers()) - {BASE_SOURCE}

    def link(self, entries: Mapping[str, Delta]) -> None:
        for name in self.references():
            entry = entries.get(name)
            if not isinstance(entry, ChannelSelect):
                raise KeyError(f"channel_select points to {name!r}, which has no channel_select entry here")
            self.linked[name] = entry

    def covers(self) -> list[str]:
        if BASE_SOURCE in self.pointers():
            return []
        return ["weight", "bias"] if self.bias is not None else ["weight"]

    def own(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``weight`` (and ``bias``) with this delta's own rows put in place."""
        w = weight.detach().clone()
        w[self.mask] = self.rows.to(w.dtype)
        b = None
        if bias is not None:
            b = bias.detach().clone()
            if self.bias is not None:
                b[self.mask] = self.bias.to(b.dtype)
        return w, b

    def resolve(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The task's full weight (and bias) from the base layer's tensors: own rows, base rows,
        and rows of the linked owners."""
        w, b = self.own(weight, bias)
        shared = (~self.mask).nonzero().flatten()
        pointers = self.pointers()
        for name, entry in self.linked.items():
            rows = shared[torch.tensor([p == name for p in pointers], dtype=torch.bool)]
            if not bool(entry.mask[rows].all()):
                bad = rows[~entry.mask[rows]][:5].tolist()
                raise ValueError(f"channel_select points to channels {bad} of {name!r}, which does not own them")
            sw, sb = entry.own(weight, bias)
            w[rows] = sw[rows]
            if b is not None:
                b[rows] = sb[rows]
        missing = self.references() - set(self.linked)
        if missing:
            raise ValueError(f"channel_select: sources {sorted(missing)} not linked; load the delta through its "
                             f"bundle (or link it to its pool)")
        return w, b

    def overlay(self, module: nn.Module) -> dict[str, torch.Tensor]:
        w, b = self.resolve(module.weight, getattr(module, "bias", None))
        return {"weight": w} | ({"bias": b} if b is not None else {})

    def validate(self, module: nn.Module) -> None:
        weight = own_tensors(module).get("weight")
        if weight is None:
            raise KeyError(f"{type(module).__name__} has no weight for a channel_select entry")
        if self.mask.dim() != 1 or self.mask.numel() != weight.shape[0]:
            raise ValueError(f"channel_select: mask of {self.mask.numel()} channels, the layer has {weight.shape[0]}")
        if tuple(self.rows.shape[1:]) != tuple(weight.shape[1:]):
            raise ValueError(f"channel_select: rows {tuple(self.rows.shape)} do not fit weight {tuple(weight.shape)}")
        has_bias = getattr(module, "bias", None) is not None
        if (self.bias is not None) != has_bias or (self.bias is not None and self.bias.numel() != self.rows.shape[0]):
            raise ValueError("channel_select: bias rows do not fit the layer's bias")

    def apply(self, module: nn.Module) -> nn.Module:
        values = self.overlay(module)
        with torch.no_grad():
            for name, value in values.items():
                own_tensors(module)[name].copy_(value)
        return module
