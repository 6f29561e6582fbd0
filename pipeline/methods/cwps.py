"""CWPS: channel-wise parameter sharing with a composite parent model (CWPS paper, section 3).

* **Pool.** The pretrained weights (source ``base``) and, per finished task, its weights
  (every Conv2d and Linear of the backbone; norms and heads stay task-specific). The runner
  hands the pool in as earlier versions (``TrainContext.pool``), each a ``TaskDelta``.
* **Composite Parent Model Search.** A short fine-tune (``search_fraction`` of the epochs)
  gives reference child weights; for every layer and output channel the parent row is the
  pool source whose row is nearest to the reference (``l2`` or ``cosine``).
* **Parametrisation.** ``w = m * w_child + (1 - m) * w_parent`` per output channel (the same
  mask mixes the bias), which for a linear op equals mixing the two layers' outputs. The
  child starts at the reference weights (its norms and head too); the parent is frozen.
  Scores start at the standardised child-parent distance of each channel (far channels lean
  task-specific). Soft stage: ``m = sigmoid(s)``; hard stage: ``m = 1[sigmoid(s) >= lam]``
  with a straight-through gradient, so lam sets the share of channels that stay own.
* **Simplification.** After the hard stage each channel is the task's own row or a pointer
  to its parent's *owner* (pool rows that a source itself borrowed point past it), stored as
  a ``ChannelSelect``; inference is a plain model.
* **Multi-task mode** (the paper's Algorithm 1, ``passes`` > 1): the runner passes over the
  tasks again; a task keeps its best-validation version and the pool takes that version.
"""
from __future__ import annotations

import fnmatch
import json
import math
import time
from typing import Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from pipeline.backbones import TaskNet
from pipeline.delta import BASE_SOURCE, ChannelSelect, TaskDelta
from pipeline.io import atomic_path
from pipeline.methods import register
from pipeline.methods.base import (NORM_TYPES, Method, MethodConfig, adaptable_layers, head_entry, norm_entries,
                                   parametrized_layers)


class CwpsConfig(MethodConfig):
    lam: float = Field(0.5, ge=0, le=1, description="hard-mask threshold: a channel stays own when sigmoid(s) >= lam "
                                                    "(0: every channel own, fine-tune; 1: every channel the parent's)")
    distance: Literal["l2", "cosine"] = Field("l2", description="kernel distance of the parent search")
    search_fraction: float = Field(0.25, gt=0, le=1, description="reference fine-tune length, as a share of the epochs")
    soft_fraction: float = Field(0.5, ge=0, lt=1, description="share of the epochs with the soft mask; the rest "
                                                               "(at least one epoch) use the hard mask")
    passes: int = Field(1, ge=1, description="1: incremental (each task borrows from the earlier ones); more: the "
                                             "multi-task mode, passing over all tasks this many times")
    layers: list[str] = Field(default_factory=lambda: ["*"], description="fnmatch patterns of module paths to share")


def kernel_distance(reference: torch.Tensor, candidates: torch.Tensor, kind: str) -> torch.Tensor:
    """Distance of each output channel's kernel of ``reference`` (C, ...) to the same channel
    of every candidate (S, C, ...): shape (S, C)."""
    ref = reference.reshape(1, reference.shape[0], -1)
    cand = candidates.reshape(candidates.shape[0], candidates.shape[1], -1)
    if kind == "l2":
        return (cand - ref).norm(dim=-1)
    return 1 - torch.nn.functional.cosine_similarity(cand, ref.expand_as(cand), dim=-1, eps=1e-12)


class ChannelGate(nn.Module):
    """Per-output-channel scores and the mask they give in the current stage."""

    def __init__(self, scores: torch.Tensor, lam: float):
        super().__init__()
        self.score = nn.Parameter(scores.clone())
        self.threshold = float(torch.logit(torch.tensor(float(lam), dtype=torch.float64)))  # -inf at 0, +inf at 1
        self.register_buffer("hard", torch.tensor(False))  # the stage, checkpointed with the model

    def hard_mask(self) -> torch.Tensor:
        return self.score.detach() >= self.threshold

    def forward(self) -> torch.Tensor:
        soft = torch.sigmoid(self.score)
        if not self.hard:
            return soft
        return self.hard_mask().to(soft.dtype) + (soft - soft.detach())  # exactly 0 or 1 forward


class ChannelMix(nn.Module):
    """Parametrisation ``child -> m * child + (1 - m) * parent``, m per output channel (dim 0)."""

    def __init__(self, parent: torch.Tensor, gate: ChannelGate, owners: list[str]):
        super().__init__()
        self.register_buffer("parent", parent.detach().clone().contiguous())
        self.gate = gate
        self.owners = owners  # who owns each parent row (a version id or "base")

    def forward(self, child: torch.Tensor) -> torch.Tensor:
        m = self.gate().reshape(-1, *([1] * (child.dim() - 1))).to(child.dtype)
        return m * child + (1 - m) * self.parent


def mixed_layers(model: nn.Module) -> list[tuple[str, nn.Module, ChannelMix]]:
    return parametrized_layers(model, ChannelMix)


def pool_rows(versions: dict[str, TaskDelta], pool: list[str], path: str, weight: torch.Tensor,
              bias: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor | None, list[str]]]:
    """(weight, bias, owner of every row) of ``base`` and every pool version at ``path``."""
    out = [(weight, bias, [BASE_SOURCE] * weight.shape[0])]
    for vid in pool:
        entry = versions[vid].entries.get(path)
        if not isinstance(entry, ChannelSelect):
            raise ValueError(f"pool version {vid!r} has no channel_select entry for {path!r} (another layer set?)")
        w, b = entry.resolve(weight, bias)
        pointers = iter(entry.pointers())
        out.append((w, b, [vid if own else next(pointers) for own in entry.mask.tolist()]))
    return out


@register
class Cwps(Method):
    name = "cwps"
    Config = CwpsConfig
    uses_pool = True

    @property
    def passes(self) -> int:
        return self.config.passes

    def _epochs(self) -> tuple[int, int]:
        """(search epochs, soft epochs) for this unit's schedule."""
        epochs = self.context.schedule.epochs
        search = max(1, math.ceil(epochs * self.config.search_fraction))
        soft = min(max(epochs - 1, 0), round(epochs * self.config.soft_fraction))
        return search, soft

    def _reference(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Fine-tune briefly for the reference child (cached in the unit's scratch directory,
        so a resumed unit does not search again)."""
        from dataclasses import replace

        from pipeline.methods.baselines import FineTune
        from pipeline.train import train_task

        ctx = self.context
        scratch = ctx.workdir / "scratch" if ctx.workdir is not None else None
        if scratch is not None and (scratch / "reference.safetensors").is_file():
            state = load_file(str(scratch / "reference.safetensors"))
            return state, json.loads((scratch / "search.json").read_text())
        search_epochs, _ = self._epochs()
        schedule = replace(ctx.schedule, epochs=search_epochs, recalibrate_norms=False)
        t0 = time.perf_counter()
        outcome = train_task(ctx.backbone, ctx.data, FineTune(), schedule, ctx.seed,
                             scratch / "search" if scratch is not None else None, ctx.signature + ":search",
                             ctx.progress)
        info = {"search_epochs": search_epochs, "reference_seconds": round(time.perf_counter() - t0, 3),
                "reference_val_acc": outcome.history[-1]["val_acc"] if outcome.history else None}
        state = {k: v.detach().contiguous() for k, v in outcome.model.state_dict().items()}
        if scratch is not None:
            with atomic_path(scratch / "reference.safetensors") as tmp:
                save_file(state, str(tmp))
            with atomic_path(scratch / "search.json") as tmp:
                tmp.write_text(json.dumps(info))
        return state, info

    def prepare(self, model: TaskNet) -> None:
        if self.context is None:
            raise RuntimeError("cwps needs its TrainContext (method.setup) before prepare: it searches on the task's data")
        super().prepare(model)
        cfg, ctx = self.config, self.context
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        reference, self.search = self._reference()
        t0 = time.perf_counter()
        layers = [(p, m) for p, m in adaptable_layers(model) if any(fnmatch.fnmatchcase(p, pat) for pat in cfg.layers)]
        # child, norms and head start where the reference fine-tune ended; the rest (layers not
        # shared, a ViT's position embedding) stays the frozen base
        starts = tuple(f"{p}." for p, _ in layers) + tuple(f"features.{p}." for p, m in model.features.named_modules()
                                                            if isinstance(m, NORM_TYPES)) + ("head.",)
        model.load_state_dict({k: reference[k] if k.startswith(starts) else v for k, v in base.items()})
        for path, layer in layers:
            weight, bias = base[f"{path}.weight"], base.get(f"{path}.bias")
            candidates = pool_rows(ctx.versions, ctx.pool, path, weight, bias)
            pool_weights = torch.stack([w for w, _, _ in candidates])
            dist = kernel_distance(layer.weight.detach(), pool_weights, cfg.distance)
            best = dist.argmin(0)
            channels = torch.arange(weight.shape[0])
            parent_w = pool_weights[best, channels]
            owners = [candidates[s][2][c] for c, s in enumerate(best.tolist())]
            d = dist[best, channels]
            scores = (d - d.mean()) / (d.std() + 1e-12) if d.numel() > 1 else torch.zeros_like(d)
            gate = ChannelGate(scores, cfg.lam)
            parametrize.register_parametrization(layer, "weight", ChannelMix(parent_w, gate, owners))
            if bias is not None:
                parent_b = torch.stack([b for _, b, _ in candidates])[best, channels]
                parametrize.register_parametrization(layer, "bias", ChannelMix(parent_b, gate, owners))
            for original in layer.parametrizations.values():
                original.original.requires_grad_(True)
        self.search["parent_search_seconds"] = round(time.perf_counter() - t0, 3)

    def start_epoch(self, model: TaskNet, epoch: int) -> None:
        _, soft = self._epochs()
        for _, _, mix in mixed_layers(model):
            mix.gate.hard.fill_(epoch >= soft)

    def task_delta(self, model: TaskNet, task: str) -> TaskDelta:
        entries = {}
        for path, layer, mix in mixed_layers(model):
            own = mix.gate.hard_mask()
            child = layer.parametrizations.weight.original.detach()
            pointers = [o for o, keep in zip(mix.owners, own.tolist()) if not keep]
            sources = [BASE_SOURCE, *sorted(set(pointers) - {BASE_SOURCE})]
            bias = layer.parametrizations.bias.original.detach()[own].clone() if "bias" in layer.parametrizations \
                else None
            entries[path] = ChannelSelect(own.clone(), child[own].contiguous().clone(), pointer_tensor(pointers, sources),
                                          sources, bias)
        delta = TaskDelta(task, self.name, entries | norm_entries(model) | head_entry(model))
        return delta.link(self.context.versions if self.context is not None else {})

    def bundle_deltas(self, final: dict[str, str], versions: dict[str, TaskDelta]) -> list[TaskDelta]:
        """Pointers to a version that a task kept become pointers to that task; rows of versions
        no task kept (multi-task passes replaced them) are copied in as the borrower's own rows."""
        kept = {vid: task for task, vid in final.items()}
        out = []
        for task, vid in final.items():
            d = versions[vid]
            entries = {}
            for path, e in d.entries.items():
                entries[path] = rebase(e, kept, versions, path) if isinstance(e, ChannelSelect) else e
            out.append(TaskDelta(task, d.method, entries, d.gate_bits))
        by_task = {d.task: d for d in out}
        return [d.link(by_task) for d in out]

    def describe(self, model: TaskNet) -> dict:
        layers = mixed_layers(model)
        borrowed: dict[str, int] = {}
        for _, _, mix in layers:
            for owner, keep in zip(mix.owners, mix.gate.hard_mask().tolist()):
                if not keep:
                    borrowed[owner] = borrowed.get(owner, 0) + 1
        return {
            "layers": [p for p, _, _ in layers],
            "channels": [len(mix.owners) for _, _, mix in layers],
            "own_channels": [int(mix.gate.hard_mask().sum()) for _, _, mix in layers],
            "borrowed": borrowed,  # shared channels by the version (or "base") that owns the row
            "pool": list(self.context.pool) if self.context else [],
            **getattr(self, "search", {}),
        }


def rebase(entry: ChannelSelect, kept: dict[str, str], versions: dict[str, TaskDelta], path: str) -> ChannelSelect:
    """``entry`` with pointers renamed from version ids to the tasks that kept them; a row of a
    version nobody kept is copied in as an own row."""
    channels = entry.mask.numel()
    rows, bias = entry.own(entry.rows.new_zeros(channels, *entry.rows.shape[1:]),
                           entry.bias.new_zeros(channels) if entry.bias is not None else None)
    mask, names = entry.mask.clone(), []
    for c, src in zip((~entry.mask).nonzero().flatten().tolist(), entry.pointers()):
        if src == BASE_SOURCE or src in kept:
            names.append(kept.get(src, src))
            continue
        owner = versions[src].entries[path]
        i = int(owner.mask[:c].sum())  # the owner's row of channel c among its own rows
        rows[c] = owner.rows[i]
        if bias is not None:
            bias[c] = owner.bias[i]
        mask[c] = True
    sources = [BASE_SOURCE, *sorted(set(names) - {BASE_SOURCE})]
    return ChannelSelect(mask, rows[mask], pointer_tensor(names, sources), sources,
                         bias[mask] if bias is not None else None)


def pointer_tensor(pointers: list[str], sources: list[str]) -> torch.Tensor:
    """Each pointer as its index in ``sources`` (uint8 up to 256 sources)."""
    index = {s: i for i, s in enumerate(sources)}
    dtype = torch.uint8 if len(sources) <= 256 else torch.int32
    return torch.tensor([index[p] for p in pointers], dtype=dtype)
