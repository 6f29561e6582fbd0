"""FTN: factorized tensor networks (Garg et al., 2023, sections 3.1-3.2).

Every adapted layer gets an additive task delta that is a sum of R rank-1 tensors, scaled
by ``alpha / R``; the backbone stays frozen and only the factors, the task norms and the
head train. Only the factors are stored (a ``LowRank`` entry), R * sum(axis lengths) values
per layer; merging adds the dense delta to the base weight.

How a weight is viewed as a CP tensor (its axes are a reshape of the weight, so the dense
delta is a view of it; axes of length 1 are dropped, as they would only repeat the scale):

* Conv2d, weight (C_out, C_in/groups, kh, kw) -> (C_out, C_in/groups, kh*kw): the paper's
  (k^2, C_in, C_out). Grouped and depthwise convs use their per-group input axis, so a
  depthwise kxk conv gets a rank-R (C_out x k^2) matrix and a 1x1 conv a rank-R
  (C_out x C_in) matrix; the delta keeps the layer's group structure, so it merges exactly.
* Linear (out, in): a rank-R matrix.
* Attention (timm's ``Attention``, fused ``qkv``), the paper's two variants:
  ``qv``: W_q and W_v, rows of qkv, each viewed (n_heads, head_dim, d_model) with its own
  factors; ``o``: W_o (proj) viewed (d_model, n_heads, head_dim). The other attention
  linear is left to the base in each variant.
"""
from __future__ import annotations

import fnmatch
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn.utils import parametrize

from pipeline.core.backbones import TaskNet
from pipeline.core.delta import CPPart, LowRank, TaskDelta
from pipeline.methods.base import Facts, GroupOptions, IncrementalMethod, NormsConfig
from pipeline.methods.layers import head_entry, norm_entries, parametrized_layers


class FtnConfig(NormsConfig):
    rank: int = Field(1, ge=1, description="default CP rank R per layer")
    rank_overrides: dict[str, int] = Field(
        default_factory=dict,
        description="module-path pattern (fnmatch, e.g. 'features.blocks.6.*') -> rank; first match wins; 0 = not adapted")
    alpha: float = Field(1.0, gt=0, description="the delta is scaled by alpha / R")
    attention: Literal["qv", "o"] = Field("qv", description="which attention weights get CP deltas (paper's variants)")
    layers: list[str] = Field(default_factory=lambda: ["*"], description="fnmatch patterns of module paths to adapt")
    attention_init_std: float = Field(0.05, gt=0, description="std of the N(0, std) init of attention factors")
    task_norms: bool = Field(True, description="train task-specific norms, as the paper; False keeps the base's "
                                               "norms and statistics (frozen, in eval mode)")
    norm_stats: Literal["task", "base"] = Field(
        "base", description="base (default): the task norms keep the pretrained statistics and train their affine "
                            "parameters (quickstart, seed 0, factors at 1e-2: 0.8425 mean accuracy against 0.8385 "
                            "without task norms); task: batch statistics while training, re-estimated on the task "
                            "(the paper)")
    init: Literal["paper", "zero"] = Field(
        "zero", description="zero (default): each part's last factor zero, so training starts exactly at the "
                            "pretrained model (as LoRA does); paper: random (Xavier) factors, which move the "
                            "features before any step (quickstart, rank 1, 5 seeds: zero 0.8316 mean accuracy, "
                            "std 0.0045; paper 0.7751, std 0.095, one task collapsing to 0.086)")

    @field_validator("rank_overrides")
    @classmethod
    def _ranks(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: r for k, r in v.items() if r < 0}
        if bad:
            raise ValueError(f"ranks must be >= 0, got {bad}")
        return v


class FtnFacts(Facts):
    layers: list[str]
    rank: list[int]
    params: list[int]  # stored factor values per layer
    base_params: list[int]  # values of the base weight each delta is added to


def _drop_unit(shape: tuple[int, ...]) -> tuple[int, ...]:
    kept = tuple(n for n in shape if n > 1)
    return kept or (1,)


def _is_attention(m: nn.Module) -> bool:
    return isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "proj", None), nn.Linear) \
        and hasattr(m, "num_heads")


def cp_layout(model: TaskNet, attention: str) -> dict[str, tuple[nn.Module, list[tuple[tuple[int, int] | None, tuple]], bool]]:
    """path -> (layer, [(rows, CP axes)], is attention) for every layer FTN can adapt, in module order."""
    attn_linears: dict[int, list] = {}
    for m in model.features.modules():
        if _is_attention(m):
            d_model, heads = m.proj.out_features, m.num_heads
            head_dim = m.qkv.out_features // 3 // heads
            inner = heads * head_dim
            attn_linears[id(m.qkv)] = [((0, inner), (heads, head_dim, d_model)),
                                       ((2 * inner, 3 * inner), (heads, head_dim, d_model))] if attention == "qv" else []
            attn_linears[id(m.proj)] = [(None, (d_model, heads, head_dim))] if attention == "o" else []
    out = {}
    for p, m in model.features.named_modules():
        path = f"features.{p}"
        if id(m) in attn_linears:
            if attn_linears[id(m)]:
                out[path] = (m, attn_linears[id(m)], True)
        elif isinstance(m, nn.Conv2d):
            c_out, c_in, kh, kw = m.weight.shape
            out[path] = (m, [(None, _drop_unit((c_out, c_in, kh * kw)))], False)
        elif isinstance(m, nn.Linear):
            out[path] = (m, [(None, _drop_unit(tuple(m.weight.shape)))], False)
    return out


class CPAdapter(nn.Module):
    """Parametrisation ``w -> w + (alpha / R) * CP(factors)`` of one layer's weight."""

    def __init__(self, parts: list[tuple[tuple[int, int] | None, tuple]], rank: int, alpha: float,
                 init_std: float | None, zero_last: bool = False):
        super().__init__()
        self.rows = [rows for rows, _ in parts]
        self.scale = alpha / rank
        self.factors = nn.ParameterList()
        self.axes = []
        for _, axes in parts:
            self.axes.append(len(axes))
            for n in axes:
                f = torch.empty(rank, n)
                # paper: Xavier-uniform factors for convs and linears, N(0, std) for attention
                nn.init.normal_(f, 0.0, init_std) if init_std is not None else nn.init.xavier_uniform_(f)
                self.factors.append(nn.Parameter(f))
            if zero_last:
                nn.init.zeros_(self.factors[-1])

    def lowrank(self) -> LowRank:
        """The current delta as stored: the scale folded into each part's first factor."""
        parts, i = [], 0
        for rows, n in zip(self.rows, self.axes):
            fs = list(self.factors[i:i + n])
            parts.append(CPPart([fs[0] * self.scale, *fs[1:]], rows))
            i += n
        return LowRank(parts)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.lowrank().dense(weight)


def adapters(model: TaskNet) -> list[tuple[str, nn.Module, CPAdapter]]:
    return parametrized_layers(model, CPAdapter)


class Ftn(IncrementalMethod):
    name = "ftn"
    Config = FtnConfig
    Facts = FtnFacts

    @property
    def task_norms(self) -> bool:
        return self.config.task_norms

    def group_of(self, name: str) -> str:
        return "factors" if ".parametrizations.weight.0.factors." in name else "body"

    def group_options(self) -> dict[str, GroupOptions]:
        """The factors under Adam at 2e-2 after a one-epoch warm-up (the paper: one SGD lr for
        everything). The paper's init moves the features before any step; under SGD at the
        entry's lr, with an SGD head at 10x, the quickstart's mean accuracy was 0.561 (one task at
        0.23); this recipe, with the task norms under Adam at 1e-3, gave 0.8207 at rank 1 over 3
        seeds with the paper's init, std 0.010 (factors at 1e-2: 0.8178, std 0.022; at 5e-3:
        0.7963, std 0.032), but 0.7751, std 0.095, over 5 later seeds; from a zero last factor
        (``init: zero``, the default) 0.8316, std 0.0045.
        ``norm_stats: task`` with ``train.optim`` and ``optim`` setting every group to
        ``{optimizer: sgd, warmup_epochs: 0}`` is the paper's setting."""
        return {"factors": GroupOptions(optimizer="adam", lr=2e-2, warmup_epochs=1),
                "norms": GroupOptions(optimizer="adam", lr=1e-3, warmup_epochs=1)}

    def rank_for(self, path: str) -> int:
        cfg = self.config
        if not any(fnmatch.fnmatchcase(path, pat) for pat in cfg.layers):
            return 0
        for pattern, rank in cfg.rank_overrides.items():
            if fnmatch.fnmatchcase(path, pattern):
                return rank
        return cfg.rank

    def prepare(self, model: TaskNet) -> None:
        super().prepare(model)
        cfg = self.config
        for path, (layer, parts, is_attention) in cp_layout(model, cfg.attention).items():
            rank = self.rank_for(path)
            if rank == 0:
                continue
            std = cfg.attention_init_std if is_attention else None
            adapter = CPAdapter(parts, rank, cfg.alpha, std, zero_last=cfg.init == "zero")
            parametrize.register_parametrization(layer, "weight", adapter)
            layer.parametrizations.weight.original.requires_grad_(False)

    def task_delta(self, model: TaskNet, task: str) -> TaskDelta:
        entries = {}
        for path, _, a in adapters(model):
            lr = a.lowrank()
            entries[path] = LowRank([CPPart([f.detach().clone() for f in p.factors], p.rows) for p in lr.parts])
        norms = norm_entries(model, self.task_statistics) if self.task_norms else {}
        return TaskDelta(task, self.name, entries | norms | head_entry(model))

    def describe(self, model: TaskNet, task: str) -> FtnFacts:
        layers = adapters(model)
        return FtnFacts(layers=[p for p, _, _ in layers], rank=[len(a.factors[0]) for _, _, a in layers],
                        params=[sum(f.numel() for f in a.factors) for _, _, a in layers],
                        base_params=[m.parametrizations.weight.original.numel() for _, m, _ in layers])


def cp_params(axes: tuple[int, ...], rank: int) -> int:
    """The paper's count for one part: R * (sum of axis lengths), e.g. R (k^2 + C_in + C_out)."""
    return rank * sum(axes)
