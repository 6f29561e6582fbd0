"""The on-disk bundle: base weights once, one small safetensors file per task, a manifest.

::

    bundle/
      manifest.json            method, backbone, versions, sha256 + size of every file, ledger
      base.safetensors         the shared backbone (TaskNet keys, ``features.*``)
      tasks/<task>.safetensors that task's TaskDelta only

Loading re-hashes every file and rebuilds the backbone from the manifest; a tampered or
truncated file, or a bundle for another backbone, fails with an error naming the file.
No pickles: tensors are safetensors, everything else JSON.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline import __version__
from pipeline.core.backbones import Backbone, BackboneError, TaskNet, build_backbone
from pipeline.core.delta import TaskDelta, read_delta, write_delta
from pipeline.core.errors import BundleError
from pipeline.core.fold import merge
from pipeline.core.io import atomic_dir, read_json, sha256_file, write_json
from pipeline.core.ledger import build_ledger

FORMAT = "taskfold-bundle/1"


def versions() -> dict[str, str]:
    import safetensors
    import timm

    return {"taskfold": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def backbone_id(backbone: Backbone, weights: str, image_size: int) -> dict:
    return {"name": backbone.name, "kwargs": backbone.kwargs, "weights": weights, "image_size": image_size,
            "mean": list(backbone.mean), "std": list(backbone.std), "num_features": backbone.num_features}


def base_state(backbone: Backbone) -> dict[str, torch.Tensor]:
    return {f"features.{k}": v.detach().contiguous() for k, v in backbone.features.state_dict().items()}


def write_bundle(out: Path, backbone: Backbone, backbone_info: dict, deltas: list[TaskDelta],
                 method: dict, num_classes: dict[str, int]) -> dict:
    """Write a complete bundle atomically (temp dir, then rename); return its manifest."""
    names = {d.task for d in deltas}
    for d in deltas:
        if missing := d.references() - names:
            raise BundleError(f"task {d.task!r} points to {sorted(missing)}, which this bundle would not hold")
    with atomic_dir(Path(out)) as tmp:
        (tmp / "tasks").mkdir()
        state = base_state(backbone)
        save_file(state, str(tmp / "base.safetensors"), metadata={"backbone": backbone.name})
        files = {"base": tmp / "base.safetensors"}
        for d in deltas:
            files[d.task] = tmp / "tasks" / f"{d.task}.safetensors"
            write_delta(files[d.task], d)
        ledger = build_ledger(state, deltas, files)
        manifest = {
            "format": FORMAT,
            "method": method,
            "backbone": backbone_info,
            "versions": versions(),
            "files": {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                      for p in files.values()},
            "tasks": {d.task: {"file": f"tasks/{d.task}.safetensors", "num_classes": num_classes[d.task]}
                      for d in deltas},
            "ledger": ledger,
        }
        write_json(tmp / "manifest.json", manifest)
    return manifest


@dataclass
class Bundle:
    root: Path
    manifest: dict
    base: TaskNet  # base features + Identity head; merge() puts each task's head in place

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    def delta(self, task: str) -> TaskDelta:
        """The task's delta, linked to the tasks it borrows rows from (channel-select pointers)."""
        d = self._read(task)
        refs = d.references()
        unknown = refs - set(self.tasks)
        if unknown:
            raise BundleError(f"{self.root / self.manifest['tasks'][task]['file']}: points to {sorted(unknown)}, "
                              f"which are not tasks of this bundle ({self.tasks})")
        return d.link({name: self._read(name) for name in refs})

    def _read(self, task: str) -> TaskDelta:
        if task not in self.manifest["tasks"]:
            raise BundleError(f"{self.root}: no task {task!r}; tasks: {self.tasks}")
        return read_delta(self.root / self.manifest["tasks"][task]["file"])

    def merged(self, task: str, branches: bool = False) -> TaskNet:
        """The task's plain model; ``branches``: low-rank deltas as side branches on the base."""
        return merge(self.base, self.delta(task), branches=branches)

    def has_branches(self) -> bool:
        """Does any task's delta run as a side branch (so a branch form differs from merged)?"""
        return any(entry.branch(self.base.get_submodule(path)) is not None
                   for task in self.tasks for path, entry in self.delta(task).entries.items())


def load_bundle(root: Path, expect_backbone: str | None = None) -> Bundle:
    """Open a bundle, verifying every file's size and sha256 and the backbone it was made for."""
    root = Path(root)
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise BundleError(f"{mpath}: not found; is {root} a taskfold bundle?")
    try:
        manifest = read_json(mpath)
    except ValueError as err:
        raise BundleError(f"{mpath}: not valid JSON: {err}") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for rel, rec in manifest["files"].items():
        p = root / rel
        if not p.is_file():
            raise BundleError(f"{p}: listed in the manifest but missing")
        if p.stat().st_size != rec["bytes"]:
            raise BundleError(f"{p}: {p.stat().st_size} bytes, manifest says {rec['bytes']} (truncated or replaced)")
        if sha256_file(p) != rec["sha256"]:
            raise BundleError(f"{p}: sha256 does not match the manifest (file changed after the bundle was written)")
    info = manifest["backbone"]
    if expect_backbone is not None and info["name"] != expect_backbone:
        raise BundleError(f"{root}: bundle is for backbone {info['name']!r}, not {expect_backbone!r}")
    base = build_backbone(info["name"], "none", info["kwargs"]).base_net()
    state = load_file(str(root / "base.safetensors"))
    try:
        missing, unexpected = base.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise BundleError(f"{root / 'base.safetensors'}: does not fit backbone {info['name']!r}: {err}") from None
    if missing or unexpected:
        raise BundleError(f"{root / 'base.safetensors'}: does not fit backbone {info['name']!r}: "
                          f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return Bundle(root, manifest, base)


__all__ = ["Bundle", "BundleError", "BackboneError", "load_bundle", "write_bundle", "read_delta", "write_delta"]
