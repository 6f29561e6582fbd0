"""TaskDelta: the one vocabulary that methods emit and fold/exporters read.

A TaskDelta maps module paths (``features.blocks.0.0.conv_dw``) to a delta kind. Each
kind knows three things and nothing else:

* ``apply(module)``: merge itself into a plain module of the base architecture and
  return the module to put at that path;
* ``params()`` / ``bits()``: its storage cost (float bits by storage dtype);
* ``tensors()`` / ``from_tensors()``: its safetensors form; ``attrs()``: small JSON facts
  that are not tensors (a row range, a layout), kept in the file's metadata.

New kinds (low-rank, channel-select, skip) register with ``@delta_kind`` and need no
change in fold, bundle or the exporters. A kind that points into *other* tasks' deltas
(channel-select borrows rows) names them in ``references()`` and is ``link``ed to them after
loading; whoever loads a delta (the bundle, the training pool) does the linking.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import ClassVar, Mapping

import torch
from torch import nn

KINDS: dict[str, type["Delta"]] = {}


def delta_kind(cls: type["Delta"]) -> type["Delta"]:
    KINDS[cls.kind] = cls
    return cls


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

    def apply(self, module: nn.Module) -> nn.Module:
        own = own_tensors(module)
        for name, value in self.values.items():
            if name not in own:
                raise KeyError(f"{type(module).__name__} has no tensor {name!r} to replace")
            if own[name].shape != value.shape:
                raise ValueError(
                    f"{type(module).__name__}.{name}: task tensor shape {tuple(value.shape)} "
                    f"!= base shape {tuple(own[name].shape)}"
                )
            with torch.no_grad():
                own[name].copy_(value)
        return module


@delta_kind
class Replace(_Overlay):
    """A dense task weight (TAPS gate on, full fine-tune): the layer's tensors, replaced."""

    kind = "replace"


@delta_kind
class Norm(_Overlay):
    """Task normalisation: affine parameters and running statistics."""

    kind = "norm"


@delta_kind
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

    def apply(self, module: nn.Module) -> nn.Module:
        head = nn.Linear(self.weight.shape[1], self.weight.shape[0])
        with torch.no_grad():
            head.weight.copy_(self.weight)
            head.bias.copy_(self.bias)
        return head


def cp_dense(factors: list[torch.Tensor]) -> torch.Tensor:
    """The dense tensor ``sum_r f_1[r] o f_2[r] o ...`` of CP factors, each of shape (R, n_i)."""
    axes = "abcdefghijk"[: len(factors)]
    return torch.einsum(",".join(f"r{a}" for a in axes) + "->" + axes, *factors)


@dataclass
class CPPart:
    """One CP term set: factors (R, n_i) whose dense tensor, reshaped, is added to ``weight[rows]``
    (all rows when ``rows`` is None). The dense tensor's axes must be a view of that block."""

    factors: list[torch.Tensor]
    rows: tuple[int, int] | None = None


@delta_kind
@dataclass
class LowRank(Delta):
    """FTN: an additive low-rank CP delta on a layer's weight. Only the factors are stored;
    ``dense()`` is the one definition of the delta, used by training, merge and the tests."""

    kind = "lowrank"
    parts: list[CPPart]

    def dense(self, weight: torch.Tensor) -> torch.Tensor:
        """The full-size delta for ``weight`` (zeros outside the parts' rows)."""
        if len(self.parts) == 1 and self.parts[0].rows is None:
            return cp_dense(self.parts[0].factors).reshape(weight.shape)
        out = weight.new_zeros(weight.shape)
        for part in self.parts:
            lo, hi = part.rows if part.rows is not None else (0, weight.shape[0])
            out[lo:hi] = cp_dense(part.factors).reshape(out[lo:hi].shape)
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"p{i}.f{j}": f for i, part in enumerate(self.parts) for j, f in enumerate(part.factors)}

    def attrs(self) -> dict:
        return {"parts": [{"rows": list(p.rows) if p.rows else None, "axes": len(p.factors)} for p in self.parts]}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], attrs: dict | None = None) -> "LowRank":
        if not attrs or "parts" not in attrs:
            raise ValueError("a low-rank entry needs attrs.parts (the layout of its factors)")
        parts = [CPPart([tensors[f"p{i}.f{j}"] for j in range(p["axes"])], tuple(p["rows"]) if p["rows"] else None)
                 for i, p in enumerate(attrs["parts"])]
        return cls(parts)

    def overlay(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": module.weight + self.dense(module.weight)}

    def apply(self, module: nn.Module) -> nn.Module:
        weight = own_tensors(module).get("weight")
        if weight is None:
            raise KeyError(f"{type(module).__name__} has no weight for a low-rank delta")
        with torch.no_grad():
            weight.add_(self.dense(weight).to(weight.dtype))
        return module

    def branch(self, module: nn.Module) -> nn.Module | None:
        """A whole-weight delta on an ungrouped conv or a linear layer runs as a side branch
        (see ``LowRankBranch``). Grouped/depthwise convs and row blocks (attention) have no
        cheaper branch, so they are merged."""
        if len(self.parts) != 1 or self.parts[0].rows is not None:
            return None
        factors = self.parts[0].factors
        if isinstance(module, nn.Conv2d) and module.groups == 1 and module.out_channels > 1:
            k = module.kernel_size[0] * module.kernel_size[1]
            axes = [n for n in (module.out_channels, module.in_channels, k) if n != 1]
        elif isinstance(module, nn.Linear) and module.out_features > 1:
            axes = [n for n in (module.out_features, module.in_features) if n != 1]
        else:
            return None
        if len(axes) < 2 or [f.shape[1] for f in factors] != axes:
            return None
        return LowRankBranch(module, factors)


class LowRankBranch(nn.Module):
    """``base(x) + up(down(x))``: the base layer untouched, plus a rank-R branch equal to the CP
    delta. ``down`` has the base layer's geometry (kernel, stride, padding, dilation) with R
    outputs and rank-1 kernels ``b_r o c_r``; ``up`` is a 1x1 map R -> C_out with ``a_r``.
    Costs R (C_in k^2 + C_out) multiply-adds per output position instead of none for a merged
    weight, and stores R (C_in k^2 + C_out) values instead of a dense C_out C_in k^2 delta."""

    def __init__(self, base: nn.Module, factors: list[torch.Tensor]):
        super().__init__()
        import copy

        self.base = base
        a, rest = factors[0], factors[1:]
        rank = a.shape[0]
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
            kernel_shape = (rank, base.in_features)
        else:
            self.down = copy.deepcopy(base)  # keeps the layer's own padding logic (timm same-padding too)
            self.down.out_channels, self.down.bias = rank, None
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
            kernel_shape = (rank, *base.weight.shape[1:])
        with torch.no_grad():
            down = rest[0] if len(rest) == 1 else torch.einsum("ri,rk->rik", rest[0], rest[1])
            self.down.weight = nn.Parameter(down.reshape(kernel_shape).clone())
            self.up.weight = nn.Parameter(a.t().reshape(self.up.weight.shape).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


@delta_kind
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

    def apply(self, module: nn.Module) -> nn.Module:
        return nn.Identity()

    @classmethod
    def of(cls, block: nn.Module) -> "Skip":
        return cls([k for k, v in block.state_dict().items() if v.is_floating_point()])


BASE_SOURCE = "base"


@delta_kind
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

    def apply(self, module: nn.Module) -> nn.Module:
        values = self.overlay(module)
        with torch.no_grad():
            for name, value in values.items():
                own_tensors(module)[name].copy_(value)
        return module


@dataclass
class TaskDelta:
    """Everything task-specific about one task, in the shared vocabulary.

    ``gate_bits`` counts binary per-layer decisions that are stored as the *presence* of
    an entry (TAPS: one gate per candidate layer); they cost bits but no tensor.
    """

    task: str
    method: str
    entries: dict[str, Delta] = field(default_factory=dict)
    gate_bits: int = 0

    def by_kind(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for d in self.entries.values():
            row = out.setdefault(d.kind, {"entries": 0, "params": 0, "bits": 0})
            row["entries"] += 1
            row["params"] += d.params()
            row["bits"] += d.bits()
        if self.gate_bits:
            out["gate"] = {"entries": self.gate_bits, "params": 0, "bits": self.gate_bits}
        return out

    def params(self) -> int:
        return sum(d.params() for d in self.entries.values())

    def bits(self) -> int:
        return sum(d.bits() for d in self.entries.values()) + self.gate_bits

    def references(self) -> set[str]:
        """Other deltas this one reads rows from (empty for every kind but channel-select)."""
        return set().union(*(d.references() for d in self.entries.values()))

    def link(self, others: Mapping[str, "TaskDelta"]) -> "TaskDelta":
        """Link every entry to the same-path entries of the deltas it references; returns self."""
        for path, entry in self.entries.items():
            if refs := entry.references():
                missing = refs - set(others)
                if missing:
                    raise KeyError(f"task {self.task!r}, entry {path!r}: points to {sorted(missing)}, not available")
                entry.link({name: others[name].entries.get(path) for name in refs})
        return self

    def flat_tensors(self) -> dict[str, torch.Tensor]:
        """``{path}::{kind}::{name}`` -> contiguous tensor, the safetensors payload."""
        return {
            f"{path}::{d.kind}::{name}": t.detach().contiguous().cpu()
            for path, d in self.entries.items()
            for name, t in d.tensors().items()
        }

    def metadata(self) -> dict[str, str]:
        """One JSON value under one key: safetensors writes metadata keys in hash order, so
        several keys would make identical deltas differ byte for byte between processes.
        ``entries`` lists (path, kind, attrs) in order, so kinds without tensors survive too."""
        entries = [[path, d.kind, d.attrs()] for path, d in self.entries.items()]
        info = {"task": self.task, "method": self.method, "gate_bits": self.gate_bits, "entries": entries}
        return {"taskfold.delta": json.dumps(info, sort_keys=True)}

    @classmethod
    def from_flat(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> "TaskDelta":
        info = json.loads(metadata["taskfold.delta"])
        if "entries" not in info:
            raise ValueError("metadata 'taskfold.delta' has no 'entries' list (written by an older taskfold?)")
        grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            try:
                path, kind, name = key.split("::")
            except ValueError:
                raise ValueError(f"tensor key {key!r} is not of the form path::kind::name") from None
            grouped.setdefault((path, kind), {})[name] = t
        entries: dict[str, Delta] = {}
        for path, kind, attrs in info["entries"]:
            if kind not in KINDS:
                raise ValueError(f"entry {path!r}: unknown delta kind {kind!r}; known: {sorted(KINDS)}")
            try:
                entries[path] = KINDS[kind].from_tensors(grouped.pop((path, kind), {}), attrs)
            except KeyError as err:
                raise ValueError(f"entry {path!r} ({kind}): missing tensor {err}") from None
        if grouped:
            path, kind = next(iter(grouped))
            raise ValueError(f"tensor {path}::{kind}::* belongs to no entry in the metadata")
        return cls(info["task"], info["method"], entries, int(info["gate_bits"]))
