"""Checking a bundle to the last byte before anything in it is used.

In order, each failure a ``BundleError`` naming the file (and the entry or tensor):

1. ``manifest.json`` is a JSON object of the manifest schema (``pipeline.core.manifest``);
2. the folder holds exactly the manifest, the base and the tasks' files: nothing unlisted, no
   links, nothing missing; each file has its listed size and sha256;
3. the backbone the manifest names is built (random init: the bundle's base replaces it) and the
   base file fits it tensor for tensor, finite;
4. every task file is a safetensors delta (parsed; a pickle or a lying header is refused) for that
   task and method, each entry fits the module it names (``Delta.validate``), the head is
   (classes, features), every value is finite, and its pointers name tasks of the bundle;
5. the ledger recomputed from the files equals the manifest's.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import safe_open

from pipeline.core.backbones import BackboneError, build_backbone
from pipeline.core.delta import TaskDelta, read_delta
from pipeline.core.errors import BundleError
from pipeline.core.io import read_json, sha256_file
from pipeline.core.ledger import build_ledger
from pipeline.core.manifest import BASE_FILE, Manifest, task_file


def _manifest(root: Path) -> Manifest:
    path = root / "manifest.json"
    if not root.is_dir():
        raise BundleError(f"{root}: not a folder; a bundle is a folder with manifest.json")
    if not path.is_file():
        raise BundleError(f"{path}: not found; is {root} a taskfold bundle?")
    try:
        raw = read_json(path)
    except (ValueError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    if raw.get("format") != "taskfold-bundle/1":
        raise BundleError(f"{path}: format {raw.get('format')!r}, expected 'taskfold-bundle/1'")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(x) for x in e["loc"])
        raise BundleError(f"{path}: {where + ': ' if where else ''}{e['msg'].removeprefix('Value error, ')}") from None


def _files(root: Path, m: Manifest) -> None:
    listed = set(m.files) | {"manifest.json"}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                raise BundleError(f"{p}: a link inside the bundle; a bundle holds its own files only")
            if name in filenames and rel not in listed:
                raise BundleError(f"{p}: not listed in the manifest (a bundle holds only the files it lists)")
            if name in dirnames and rel != "tasks":
                raise BundleError(f"{p}: an unexpected folder in the bundle")
    for rel, rec in m.files.items():
        p = root / rel
        if not p.is_file():
            raise BundleError(f"{p}: listed in the manifest but missing")
        if p.stat().st_size != rec.bytes:
            raise BundleError(f"{p}: {p.stat().st_size} bytes, manifest says {rec.bytes} (truncated or replaced)")
        if sha256_file(p) != rec.sha256:
            raise BundleError(f"{p}: sha256 does not match the manifest (file changed after the bundle was written)")


def _finite(t: torch.Tensor) -> bool:
    return not t.is_floating_point() or bool(torch.isfinite(t).all())


def _base(root: Path, m: Manifest, expect_backbone: str | None):
    info = m.backbone
    if expect_backbone is not None and info.name != expect_backbone:
        raise BundleError(f"{root}: bundle is for backbone {info.name!r}, not {expect_backbone!r}")
    try:
        base = build_backbone(info.name, "none", info.kwargs).base_net()
    except (BackboneError, TypeError, ValueError, RuntimeError) as err:
        raise BundleError(f"{root / 'manifest.json'}: backbone {info.name!r} with kwargs {info.kwargs} cannot be "
                          f"built: {err}") from None
    path = root / BASE_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise BundleError(f"{path}: not a readable safetensors file: {err}") from None
    target = base.state_dict()
    if set(state) != set(target):
        missing, extra = sorted(set(target) - set(state)), sorted(set(state) - set(target))
        raise BundleError(f"{path}: does not fit backbone {info.name!r}: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, ref in target.items():
        if state[k].shape != ref.shape or state[k].dtype != ref.dtype:
            raise BundleError(f"{path}: does not fit backbone {info.name!r}: tensor {k!r} is {state[k].dtype} "
                              f"{tuple(state[k].shape)}, the model's {ref.dtype} {tuple(ref.shape)}")
        if not _finite(state[k]):
            raise BundleError(f"{path}: tensor {k!r} has non-finite values")
    base.load_state_dict(state)
    return base, state


def _task(root: Path, m: Manifest, task: str, base) -> TaskDelta:
    path = root / task_file(task)
    delta = read_delta(path)  # a file that is not a safetensors delta is a BundleError naming it
    expected = (m.method.get("tasks") or {}).get(task, m.method["name"])  # a plan mixes methods, one per task
    if delta.task != task or delta.method != expected:
        raise BundleError(f"{path}: holds task {delta.task!r} of method {delta.method!r}, the manifest says task "
                          f"{task!r} of {expected!r}")
    names = m.tasks[task].classes
    if names is not None and len(names) != m.tasks[task].num_classes:
        raise BundleError(f"{root / 'manifest.json'}: tasks.{task}.classes names {len(names)} classes, num_classes "
                          f"is {m.tasks[task].num_classes}")
    for p, entry in delta.entries.items():
        if p == "head":
            w = entry.tensors().get("weight")
            want = (m.tasks[task].num_classes, m.backbone.num_features)
            if w is None or tuple(w.shape) != want:
                raise BundleError(f"{path}: entry 'head' is {tuple(w.shape) if w is not None else None}, expected "
                                  f"(classes, features) {want}")
        try:
            module = base.get_submodule(p)
            entry.validate(module)
        except (AttributeError, KeyError, ValueError, RuntimeError) as err:
            raise BundleError(f"{path}: entry {p!r} ({entry.kind}) does not fit backbone {m.backbone.name!r}: {err}") \
                from None
        for name, t in entry.tensors().items():
            if not _finite(t):
                raise BundleError(f"{path}: tensor {p}::{entry.kind}::{name} has non-finite values")
    return delta


def _ledger(root: Path, m: Manifest, state: dict, deltas: dict[str, TaskDelta]) -> dict:
    files = {"base": root / BASE_FILE} | {t: root / task_file(t) for t in deltas}
    ledger = build_ledger(state, list(deltas.values()), files)

    def same(a, b) -> bool:
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, float) or isinstance(b, float):
            return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9)
        return a == b

    if not same(ledger, m.ledger):
        raise BundleError(f"{root / 'manifest.json'}: the ledger does not match the bundle's files (recomputed: "
                          f"{ledger['total']})")
    return ledger


def verify(root: Path, expect_backbone: str | None, bundle_type):
    m = _manifest(root)
    _files(root, m)
    base, state = _base(root, m, expect_backbone)
    deltas = {t: _task(root, m, t, base) for t in m.tasks}
    for t, d in deltas.items():
        if unknown := d.references() - set(deltas):
            raise BundleError(f"{root / task_file(t)}: points to {sorted(unknown)}, which are not tasks of this bundle "
                              f"({sorted(deltas)})")
        try:
            d.link(deltas)
            for p, entry in d.entries.items():
                if entry.references():
                    entry.overlay(base.get_submodule(p))  # pointers resolve to rows their owners really own
        except (KeyError, ValueError) as err:
            raise BundleError(f"{root / task_file(t)}: {err}") from None
    ledger = _ledger(root, m, state, deltas)
    return bundle_type(root, m.model_dump(mode="json"), base, deltas, ledger)
