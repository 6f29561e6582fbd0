"""From bundles to an exports folder, with nothing but the bundles: the base and every task's
merged model as ONNX (its task, method and class names in the file's metadata), each checked
against torch, the FLOPs of each, then the deployment forms, ``forms.json`` and ``export.json``
(what ``taskfold bench`` needs to time the folder on another machine).

The checks run on the images given per task (a run's test split), or, for a bundle alone, on
seeded random inputs (ONNX against torch and every exact form against merged need no real
images); INT8 needs real calibration images, and without any it is left out with that reason.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from exporters.build import CheckFailed, Thresholds, build_forms
from exporters.compute import count_flops
from exporters.forms import OPTIONAL
from exporters.images import TaskImages
from exporters.onnx import OnnxExporter, base_model, parity
from exporters.runtime import session
from pipeline.core.io import write_json

SYNTHETIC_IMAGES = 64  # seeded random inputs per task when no images are given


def synthetic_images(image_size: int, n: int = SYNTHETIC_IMAGES, seed: int = 0) -> TaskImages:
    """Seeded standard-normal inputs (what normalised images look like to the model), no labels."""
    x = np.random.default_rng(seed).standard_normal((n, 3, image_size, image_size), dtype=np.float32)
    return TaskImages(np.zeros((0, 3, image_size, image_size), np.float32), lambda: [x[i : i + 32] for i in
                                                                                    range(0, n, 32)], None)


def metadata(label: str, task: str, bundle) -> dict[str, str]:
    """What a merged file says about itself: its task and class names, and how its inputs are
    made (read back by ``taskfold predict``)."""
    b, rec = bundle.manifest["backbone"], bundle.manifest["tasks"][task]
    pre = {"image_size": b["image_size"], "mean": b["mean"], "std": b["std"], "interpolation": b.get("interpolation"),
           "crop_pct": rec.get("crop_pct") or b.get("crop_pct")}
    out = {"taskfold.task": task, "taskfold.method": bundle.manifest["method"]["name"], "taskfold.label": label,
           "taskfold.num_classes": str(rec["num_classes"]), "taskfold.preprocess": json.dumps(pre)}
    if classes := bundle.classes(task):
        out["taskfold.classes"] = json.dumps(classes)
    return out


def export_bundles(bundles: dict, out: Path, forms: list[str] | None = None, images: dict[str, TaskImages] | None = None,
                   base_features: torch.nn.Module | None = None, opset: int = 18, threads: int = 2,
                   options: dict | None = None, thresholds: Thresholds = Thresholds(),
                   log: Callable[[str], None] = print) -> dict:
    """Export ``bundles`` (label -> ``pipeline.core.bundle.Bundle``) into ``out``. ``base_features``:
    the backbone ``base.onnx`` is made of (default: the first bundle's base). Returns the record."""
    out = Path(out)
    first = next(iter(bundles.values()))
    info = first.manifest["backbone"]
    size = info["image_size"]
    exporter = OnnxExporter(size, opset)
    n0 = next(iter(first.manifest["tasks"].values()))["num_classes"]
    base = base_model(base_features if base_features is not None else first.base.features, info["num_features"], n0)
    t0 = time.perf_counter()
    exporter.export(base, out / "base.onnx")
    seconds = {"merged": {"build": time.perf_counter() - t0, "check": 0.0}}
    outputs, parities, flops = ["base.onnx"], {}, {"base": count_flops(base, size)}
    images = images or {}
    for label, bundle in bundles.items():
        for task in bundle.tasks:
            rel = f"{label}/{task}.onnx"
            t0 = time.perf_counter()
            merged = bundle.merged(task)
            flops[f"{label}/{task}"] = count_flops(merged, size)
            exporter.export(merged, out / rel, metadata(label, task, bundle))
            t1 = time.perf_counter()
            given = images.get(task)
            check = parity(merged, session(out / rel, threads), (given or synthetic_images(size)).exact_batches())
            seconds["merged"]["build"] += t1 - t0
            seconds["merged"]["check"] += time.perf_counter() - t1
            if reason := thresholds.verdict(check, lossy=False):
                (out / rel).unlink(missing_ok=True)
                raise CheckFailed(f"{out / rel}: ONNX Runtime does not reproduce torch on the "
                                  f"{'test images' if given else 'check inputs'}: {reason}; the file was removed")
            parities[f"{label}/{task}"] = check
            outputs.append(rel)
            log(f"export {rel}: max |onnx - torch| {check['max_abs_diff']:.2e}, argmax agreement "
                f"{check['argmax_agree']:.4f} on {check['images']} {'test images' if given else 'check inputs'}")
    record = {"image_size": size, "backbone": info["name"], "opset": opset, "outputs": outputs, "parity": parities,
              "flops": flops, "traces": exporter.traces}
    seconds["merged"] = {k: round(v, 2) for k, v in seconds["merged"].items()}
    forms = list(OPTIONAL if forms is None else forms)
    if forms:
        log(f"export: deployment forms {', '.join(forms)}")
        for_forms = {t: images.get(t) or synthetic_images(size) for b in bundles.values() for t in b.tasks}
        if not any(len(i.calibration) for i in for_forms.values()) and "int8" in forms:
            forms = [f for f in forms if f != "int8"]
            log("export: no calibration images, so no INT8 form (taskfold export --calibration DIR gives some)")
        built = build_forms(out, exporter, forms, bundles, for_forms, threads, options, log, thresholds)
        record |= {"forms": built["forms"], "form_checks": built["checks"]}
        seconds |= {k: v for k, v in built["seconds"].items() if k != "merged"}
        outputs.append("forms.json")
    record["seconds"] = seconds  # per form, build (ONNX export and tracing for merged) and check
    write_json(out / "export.json", {k: v for k, v in record.items() if k not in ("forms",)})
    log(f"export: {len(outputs)} files from {exporter.traces} trace(s) in {out}; seconds per form (build, check): "
        + ", ".join(f"{k} {v['build']:.0f}+{v['check']:.0f}" for k, v in seconds.items()))
    return record


def export(bundle, out: Path, forms: list[str] | None = None, calibration: np.ndarray | None = None,
           threads: int = 2, log: Callable[[str], None] = print) -> dict:
    """Export one bundle (a ``Bundle`` or its folder) into ``out`` with the given forms (default
    every form); ``calibration``: normalised images (N, 3, S, S) for INT8, the same for every task."""
    from pipeline.core.bundle import load_bundle

    if not hasattr(bundle, "merged"):
        bundle = load_bundle(Path(bundle))
    label = bundle.manifest["method"].get("label") or bundle.manifest["method"]["name"]
    images = None
    if calibration is not None and len(calibration):
        size = bundle.manifest["backbone"]["image_size"]
        x = np.ascontiguousarray(calibration, dtype=np.float32)
        if x.shape[1:] != (3, size, size):
            raise ValueError(f"calibration images are {x.shape[1:]}, the bundle's inputs (3, {size}, {size})")
        images = {t: TaskImages(x, synthetic_images(size).batches, None) for t in bundle.tasks}
    return export_bundles({label: bundle}, out, forms, images, threads=threads, log=log)


def read_metadata(path: Path) -> dict[str, str]:
    """The ``taskfold.*`` metadata of an exported model file."""
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props
            if p.key.startswith("taskfold.")}
