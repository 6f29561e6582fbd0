"""FTN's additive low-rank CP delta (``lowrank``) and its side-branch module.

Only the factors are stored; ``LowRank.dense()`` is the one definition of the delta, used by
training, merge and the tests. ``LowRankBranch`` runs the delta next to the untouched base
layer, so a deployed graph keeps sharing the base weights.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.core.delta.base import Delta, own_tensors


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

    def validate(self, module: nn.Module) -> None:
        weight = own_tensors(module).get("weight")
        if weight is None:
            raise KeyError(f"{type(module).__name__} has no weight for a low-rank delta")
        for part in self.parts:
            if any(f.dim() != 2 or f.shape[0] != part.factors[0].shape[0] for f in part.factors):
                raise ValueError("low-rank factors must all be (rank, n) with one rank")
            lo, hi = part.rows if part.rows is not None else (0, weight.shape[0])
            if not 0 <= lo < hi <= weight.shape[0]:
                raise ValueError(f"low-rank rows {part.rows} outside the weight's {weight.shape[0]} rows")
            n = 1
            for f in part.factors:
                n *= f.shape[1]
            if n != weight[lo:hi].numel():
                raise ValueError(f"low-rank factors span {n} values, the weight block {tuple(weight[lo:hi].shape)} has "
                                 f"{weight[lo:hi].numel()}")

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
            layouts = ([n for n in (module.out_channels, module.in_channels, k) if n != 1],  # FTN: CP over 3 axes
                       [module.out_channels, module.in_channels * k])  # LoRA: B, and A over (in, kh, kw)
        elif isinstance(module, nn.Linear) and module.out_features > 1:
            layouts = ([n for n in (module.out_features, module.in_features) if n != 1],)
        else:
            return None
        if not any(len(axes) >= 2 and [f.shape[1] for f in factors] == axes for axes in layouts):
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
