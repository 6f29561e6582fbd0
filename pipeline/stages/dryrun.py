"""``taskfold run CONFIG --dry-run``: what a run would do, without data or training.

Prints the training units, the images per split (where the data is present), the optimiser
steps per unit, the device, and an estimate of peak memory per process: the model's weights,
its trainable parameters' gradients and optimiser state, the activations that one batch keeps
for the backward pass (measured by a forward pass on PyTorch's meta device: no memory is
allocated, no weights are loaded), and the data loader's prefetched batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.config import RunConfig
from pipeline.core.errors import TaskfoldError
from pipeline.data import DataError
from pipeline.methods import REGISTRY, build_method
from pipeline.methods.base import PoolMethod

MISSING_DATA = 3  # the exit code of a dry run whose config is valid but whose data is absent here


@dataclass
class Plan:
    lines: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # data or weights not present here


def _absent(cfg: RunConfig) -> list[str]:
    out = []
    for i, t in enumerate(cfg.tasks):
        if t.source.root is not None and not Path(t.source.root).exists():
            out.append(f"tasks[{i}].source.root: {t.source.root} does not exist (task {t.name!r})")
    w = cfg.backbone.weights
    if w not in ("packaged", "none", "hub") and not Path(w).is_file():
        out.append(f"backbone.weights: {w} does not exist")
    return out


def _meta_backbone(cfg: RunConfig):
    from pipeline.core.backbones import _build

    with torch.device("meta"):
        return _build(cfg.backbone.name, "none", dict(cfg.backbone.kwargs))


def _activation_bytes(cfg: RunConfig, bb, batch: int) -> int:
    """Bytes of the activations a training forward keeps for backward, for one batch (meta device)."""
    with torch.device("meta"):
        model = bb.task_net(10)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    model.train()
    size = cfg.backbone.image_size
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.empty(batch, 3, size, size, device="meta")).sum()
    return saved[0]


def _model_bytes(cfg: RunConfig, bb, entry) -> tuple[int, int, str]:
    """(every tensor's bytes, trainable bytes, note) of one entry's model, prepared on the meta
    device (no weights loaded). A method that cannot be prepared without data (CWPS searches its
    parents first) is counted as a child and a parent per weight."""
    from types import SimpleNamespace

    method = build_method(entry.name, entry.params)
    note = ""
    with torch.device("meta"):
        if REGISTRY[entry.name].trainer == "joint":
            from pipeline.training.joint import build_model

            tasks = {t.name: SimpleNamespace(num_classes=10) for t in cfg.tasks}
            model = build_model(bb, tasks, method, seed=0)
        else:
            model = bb.task_net(10)
            try:
                method.prepare(model)
            except Exception:  # noqa: BLE001  (a method that needs its data to prepare)
                model.requires_grad_(True)
                note = f" ({entry.label}: not prepared without data; counted as two copies of the weights)"
    every = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return every, trainable * (2 if note else 1), note


def plan(cfg: RunConfig, world: int = 1) -> Plan:
    p = Plan(missing=_absent(cfg))
    L = p.lines
    t = cfg.train
    from pipeline.training.runtime import DeviceError, resolve_device

    try:
        device = str(resolve_device(cfg.run.device))
    except DeviceError as err:
        device = f"unavailable here ({err})"
    L.append(f"backbone {cfg.backbone.name} at {cfg.backbone.image_size} px; device {device}, precision "
             f"{cfg.run.precision}, {world} process(es), batch {t.batch_size} ({t.batch_size // max(1, world)} per "
             f"process), augment {t.augment}")
    sizes = {}
    for task in cfg.tasks:
        if any(task.name in m for m in p.missing):
            L.append(f"task {task.name}: {task.source.type} at {task.source.root}: data absent here")
            continue
        try:
            from pipeline.data import build_index
            from pipeline.data.tasks import open_task_source

            index = build_index(task, open_task_source(task, cfg.run.seed), cfg.run.seed)
        except (DataError, TaskfoldError) as err:
            p.missing.append(str(err))
            L.append(f"task {task.name}: {err}")
            continue
        sizes[task.name] = index.sizes()
        L.append(f"task {task.name}: {index.num_classes} classes, images train {sizes[task.name]['train']}, "
                 f"val {sizes[task.name]['val']}, test {sizes[task.name]['test']}")
    L.append("units:")
    for m in cfg.methods:
        method = build_method(m.name, m.params)
        epochs = m.epochs or t.epochs
        kind = REGISTRY[m.name].trainer
        if kind == "joint":
            n = max((s["train"] for s in sizes.values()), default=None)
            steps = f"{epochs * math.ceil(n / t.batch_size)} steps of {len(cfg.tasks)} tasks" if n else "steps unknown"
            L.append(f"  {m.label}/joint ({m.name}, all {len(cfg.tasks)} tasks at once): {epochs} epochs, {steps}")
            continue
        passes = method.passes if isinstance(method, PoolMethod) else 1
        for task in cfg.tasks:
            n = sizes.get(task.name, {}).get("train")
            steps = f"{epochs * math.ceil(n / t.batch_size)} steps" if n else "steps unknown"
            L.append(f"  {m.label}/{task.name} ({m.name}{f', {passes} passes' if passes > 1 else ''}): "
                     f"{epochs} epochs, {steps}")
    try:
        per = max(1, t.batch_size // max(1, world))
        bb = _meta_backbone(cfg)
        acts = _activation_bytes(cfg, bb, per)
        # the largest entry: its tensors, and per trainable value a gradient and the optimiser's
        # state (SGD momentum: one; Adam: two; counted as two)
        every, trainable, note = max((_model_bytes(cfg, bb, m) for m in cfg.methods), key=lambda s: s[0] + 3 * s[1])
        workers = 0 if cfg.run.workers == "auto" else cfg.run.workers
        loader = 2 * max(1, workers) * per * 3 * cfg.backbone.image_size ** 2 * 4
        total = every + 3 * trainable + acts + loader
        half = "; autocast keeps most of them in 16 bits" if cfg.run.precision != "fp32" else ""
        L.append(f"peak memory per process, estimated: {total / 2**30:.2f} GiB (model {every / 2**20:.0f} MiB, "
                 f"gradients and optimiser state {3 * trainable / 2**20:.0f} MiB, activations of a {per}-image "
                 f"batch {acts / 2**20:.0f} MiB in float32{half}, loader {loader / 2**20:.0f} MiB){note}")
    except Exception as err:  # noqa: BLE001  (an architecture the meta device cannot run)
        L.append(f"peak memory: not estimated ({type(err).__name__}: {err})")
    if p.missing:
        L.append("not present here: " + "; ".join(p.missing))
    return p
