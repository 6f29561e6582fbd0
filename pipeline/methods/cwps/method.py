"""CWPS: channel-wise parameter sharing with a composite parent model (CWPS paper, section 3).

* **Pool.** The pretrained weights (source ``base``) and, per finished task, its weights
  (every Conv2d and Linear of the backbone; norms and heads stay task-specific). The pool
  trainer hands it in as earlier versions (``TaskContext.pool``), each a ``TaskDelta``.
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
* **Multi-task mode** (the paper's Algorithm 1, ``passes`` > 1): the pool trainer passes over
  the tasks again; a task keeps its best-validation version and the pool takes that version.
"""
from __future__ import annotations

import fnmatch
import json
import math
import time

import torch
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize

from pipeline.core.backbones import TaskNet
from pipeline.core.delta import BASE_SOURCE, ChannelSelect, TaskDelta
from pipeline.core.io import atomic_path
from pipeline.methods.base import PoolMethod
from pipeline.methods.cwps.mixing import ChannelGate, ChannelMix, CwpsConfig, CwpsFacts, kernel_distance, mixed_layers
from pipeline.methods.cwps.pool import pointer_tensor, pool_rows, rebase
from pipeline.methods.layers import NORM_TYPES, adaptable_layers, head_entry, norm_entries


class Cwps(PoolMethod):
    name = "cwps"
    Config = CwpsConfig
    Facts = CwpsFacts

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
        so a resumed unit does not search again); the trainer's own loop runs it."""
        from dataclasses import replace

        from pipeline.methods.baselines import FineTune

        ctx = self.context
        scratch = ctx.workdir / "scratch" if ctx.workdir is not None else None
        if scratch is not None and (scratch / "reference.safetensors").is_file():
            state = load_file(str(scratch / "reference.safetensors"))
            return state, json.loads((scratch / "search.json").read_text())
        if ctx.fit is None:
            raise RuntimeError("cwps needs a trainer in its TaskContext (context.fit) for its reference fine-tune")
        search_epochs, _ = self._epochs()
        schedule = replace(ctx.schedule, epochs=search_epochs, recalibrate_norms=False)
        t0 = time.perf_counter()
        outcome = ctx.fit(FineTune(), schedule, scratch / "search" if scratch is not None else None,
                          ctx.signature + ":search")
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
            raise RuntimeError("cwps needs its TaskContext (method.setup) before prepare: it searches on the task's data")
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
        delta = TaskDelta(task, self.name, entries | norm_entries(model, self.task_statistics) | head_entry(model))
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
            out.append(TaskDelta(task, d.method, entries, d.gate_bits, list(d.classes)))
        by_task = {d.task: d for d in out}
        return [d.link(by_task) for d in out]

    def group_of(self, name: str) -> str:
        return "gates" if name.endswith(".gate.score") else "body"

    def describe(self, model: TaskNet, task: str) -> CwpsFacts:
        layers = mixed_layers(model)
        borrowed: dict[str, int] = {}
        for _, _, mix in layers:
            for owner, keep in zip(mix.owners, mix.gate.hard_mask().tolist()):
                if not keep:
                    borrowed[owner] = borrowed.get(owner, 0) + 1
        return CwpsFacts(layers=[p for p, _, _ in layers], channels=[len(mix.owners) for _, _, mix in layers],
                         own_channels=[int(mix.gate.hard_mask().sum()) for _, _, mix in layers], borrowed=borrowed,
                         pool=list(self.context.pool) if self.context else [], **getattr(self, "search", {}))

    @classmethod
    def summarise(cls, entry: dict) -> dict:
        from pipeline.methods.cwps.report import relation

        return {"relation": relation(cls.facts(entry))}

    @classmethod
    def report(cls, label, entry, plot_dir):
        from pipeline.methods.cwps.report import relation_section

        return relation_section(label, entry["relation"], plot_dir)
