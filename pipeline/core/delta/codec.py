"""A TaskDelta's file form: one safetensors file, tensors under ``path::kind::name`` and one
metadata key, ``taskfold.delta``, listing every entry as ``[path, kind, attrs]`` in order (so
kinds without tensors, such as ``skip``, survive too).

Why one key: safetensors writes metadata keys in hash order, so several keys would make
identical deltas differ byte for byte between processes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from pipeline.core.delta.base import Delta
from pipeline.core.delta.registry import KINDS
from pipeline.core.delta.task_delta import TaskDelta
from pipeline.core.errors import BundleError

METADATA_KEY = "taskfold.delta"


def metadata(delta: TaskDelta) -> dict[str, str]:
    entries = [[path, d.kind, d.attrs()] for path, d in delta.entries.items()]
    info = {"task": delta.task, "method": delta.method, "gate_bits": delta.gate_bits, "entries": entries}
    if delta.classes:
        info["classes"] = list(delta.classes)
    return {METADATA_KEY: json.dumps(info, sort_keys=True)}


def decode(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> TaskDelta:
    """The TaskDelta of a file's tensors and metadata; ValueError naming the entry at fault."""
    info = json.loads(meta[METADATA_KEY])
    if "entries" not in info:
        raise ValueError(f"metadata {METADATA_KEY!r} has no 'entries' list (written by an older taskfold?)")
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
    classes = info.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError("metadata 'classes' is not a list of names")
    return TaskDelta(info["task"], info["method"], entries, int(info["gate_bits"]), classes)


def write_delta(path: Path, delta: TaskDelta) -> None:
    save_file(delta.flat_tensors(), str(path), metadata=metadata(delta))


def read_delta(path: Path) -> TaskDelta:
    """Read a delta file; a file that is not one is a ``BundleError`` naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise BundleError(f"{path}: not a readable task delta: {err}") from None
    if METADATA_KEY not in meta:
        raise BundleError(f"{path}: safetensors metadata lacks {METADATA_KEY!r}; not a taskfold delta")
    try:
        return decode(tensors, meta)
    except (KeyError, ValueError) as err:
        raise BundleError(f"{path}: {err}") from None
