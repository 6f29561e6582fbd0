"""Builds every deployment form of a run's bundles next to the merged ONNX models, checks each
against its reference on the test split, and writes ``forms.json``: for each method and form,
the files a device needs for its K tasks (or why the form is unavailable for that method).

The shared folder (every form that shares base weights) is written to a temp folder, checked
there, and renamed into place whole: its files point into each other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import onnx
from pydantic import BaseModel

from exporters.datafiles import BASE_DATA, SHARED, SharedWriter
from exporters.forms import FORMS
from exporters.forms.base import BuildContext
from exporters.loader import Loader
from exporters.onnx import OnnxExporter
from pipeline.core.io import atomic_dir, write_json


def build_forms(exports: Path, exporter: OnnxExporter, forms: list[str], bundles: dict, images: dict,
                threads: int, options: dict[str, BaseModel] | None = None, log: Callable[[str], None] = print) -> dict:
    """``forms``: names from ``FORMS`` (merged is always built); ``bundles``: label -> Bundle whose
    merged models are already at ``<label>/<task>.onnx``; ``images[task]``: a ``TaskImages``.
    Returns ``{"forms": ..., "checks": ...}``."""
    exports = Path(exports)
    wanted = ["merged"] + [f for f in FORMS if f in forms and f != "merged"]
    manifest: dict = {"methods": {}}
    base = onnx.load(str(exports / "base.onnx"))
    with atomic_dir(exports / SHARED) as tmp:
        writer = SharedWriter(tmp, base)
        ctx = BuildContext(exports, writer, exporter, Loader(exports, threads, shared_dir=tmp), images,
                           dict(options or {}), log, forms=FORMS)
        manifest["base_data"] = {"file": f"{SHARED}/{BASE_DATA}", "bytes": writer.base_bytes}
        for label, bundle in bundles.items():
            ctx.bundle_base(bundle)
            specs = ctx.specs.setdefault(label, {})
            for name in wanted:
                specs[name] = _build_one(ctx, name, label, bundle, specs)
            manifest["methods"][label] = specs
        manifest["extra_bases"] = {f"{SHARED}/{loc}": n for loc, n in writer.base_files.items() if loc != BASE_DATA}
        checks = dict(ctx.checks)
        for label, specs in manifest["methods"].items():
            for name, spec in specs.items():
                if "unavailable" in spec:
                    continue
                checks |= FORMS[name](ctx.options.get(name)).check(ctx, label, spec)
                spec["bytes"] = sum(ctx.loader.path(f).stat().st_size for f in spec["files"])
    write_json(exports / "forms.json", manifest)
    return {"forms": manifest, "checks": checks}


def _build_one(ctx: BuildContext, name: str, label: str, bundle, built: dict) -> dict:
    form = FORMS[name](ctx.options.get(name))
    missing = [r for r in form.requires if r not in built or "unavailable" in built[r]]
    reason = form.applies(bundle) or (f"needs the {', '.join(missing)} form" if missing else None)
    if reason:
        return {"unavailable": reason}
    return form.build(ctx, label, bundle)
