"""The on-disk bundle: base weights once, one small safetensors file per task, a manifest.

::

    bundle/
      manifest.json            method, backbone, versions, sha256 + size of every file, ledger
      base.safetensors         the shared backbone (TaskNet keys, ``features.*``)
      tasks/<task>.safetensors that task's TaskDelta only

A bundle is untrusted input. Loading checks it to the last byte before using it
(``pipeline.core.verify``): the manifest's schema, every file on disk listed and every listed
file there, sizes and sha256, every tensor file parsed, the base against the backbone the
manifest names, every task's delta against that base, all values finite, and the ledger
recomputed from the files. Any failure is a ``BundleError`` naming the file and what is wrong.
No pickles: tensors are safetensors, everything else JSON.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline import __version__
from pipeline.core.backbones import Backbone, BackboneError, TaskNet, build_backbone
from pipeline.core.delta import TaskDelta, read_delta, write_delta
from pipeline.core.errors import BundleError
from pipeline.core.fold import merge
from pipeline.core.io import atomic_dir, sha256_file, write_json
from pipeline.core.ledger import build_ledger
from pipeline.core.manifest import BASE_FILE, FORMAT, task_file


def versions() -> dict[str, str]:
    import safetensors
    import timm

    return {"taskfold": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def backbone_id(backbone: Backbone, weights: str, image_size: int) -> dict:
    return {"name": backbone.name, "kwargs": backbone.kwargs, "weights": weights, "image_size": image_size,
            "mean": list(backbone.mean), "std": list(backbone.std), "num_features": backbone.num_features,
            "interpolation": backbone.interpolation, "crop_pct": backbone.crop_pct}


def base_state(backbone: Backbone) -> dict[str, torch.Tensor]:
    return {f"features.{k}": v.detach().contiguous() for k, v in backbone.features.state_dict().items()}


def write_bundle(out: Path, backbone: Backbone, backbone_info: dict, deltas: list[TaskDelta],
                 method: dict, num_classes: dict[str, int], task_info: dict[str, dict] | None = None) -> dict:
    """Write a complete bundle atomically (temp dir, then rename); return its manifest.
    ``task_info[task]``: facts for the manifest's task record (``crop_pct``); class names come
    from each delta."""
    names = {d.task for d in deltas}
    for d in deltas:
        if missing := d.references() - names:
            raise BundleError(f"task {d.task!r} points to {sorted(missing)}, which this bundle would not hold")
    with atomic_dir(Path(out)) as tmp:
        (tmp / "tasks").mkdir()
        state = base_state(backbone)
        save_file(state, str(tmp / BASE_FILE), metadata={"backbone": backbone.name})
        files = {"base": tmp / BASE_FILE}
        for d in deltas:
            files[d.task] = tmp / task_file(d.task)
            write_delta(files[d.task], d)
        ledger = build_ledger(state, deltas, files)
        manifest = {
            "format": FORMAT,
            "method": method,
            "backbone": backbone_info,
            "versions": versions(),
            "files": {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                      for p in files.values()},
            "tasks": {d.task: {"file": task_file(d.task), "num_classes": num_classes[d.task]}
                      | ({"classes": list(d.classes)} if d.classes else {})
                      | {k: v for k, v in (task_info or {}).get(d.task, {}).items() if v is not None}
                      for d in deltas},
            "ledger": ledger,
        }
        write_json(tmp / "manifest.json", manifest)
    return manifest


@dataclass
class Bundle:
    """A verified bundle: the base model, every task's delta (linked), and the ledger recomputed
    from its files."""

    root: Path
    manifest: dict
    base: TaskNet  # base features + Identity head; merge() puts each task's head in place
    deltas: dict[str, TaskDelta] = field(default_factory=dict)
    ledger: dict = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    def classes(self, task: str) -> list[str] | None:
        return self.manifest["tasks"][task].get("classes")

    def delta(self, task: str) -> TaskDelta:
        """The task's delta, linked to the tasks it borrows rows from (channel-select pointers)."""
        if task not in self.deltas:
            raise BundleError(f"{self.root}: no task {task!r}; tasks: {self.tasks}")
        return self.deltas[task]

    def merged(self, task: str, branches: bool = False) -> TaskNet:
        """The task's plain model; ``branches``: low-rank deltas as side branches on the base."""
        return merge(self.base, self.delta(task), branches=branches)


def load_bundle(root: Path, expect_backbone: str | None = None) -> Bundle:
    """Open a bundle, checking everything in it (see the module docstring) and that it was made
    for ``expect_backbone`` when given."""
    from pipeline.core.verify import verify

    return verify(Path(root), expect_backbone, Bundle)


__all__ = ["Bundle", "BundleError", "BackboneError", "load_bundle", "write_bundle", "read_delta", "write_delta"]
