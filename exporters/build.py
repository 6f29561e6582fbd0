"""Builds every deployment form of a run's bundles next to the merged ONNX models, checks each
against its reference on the test split, and writes ``forms.json``: for each method and form,
the files a device needs for its K tasks (or why the form is unavailable for that method).

The shared folder (every form that shares base weights) is written to a temp folder, checked
there, and renamed into place whole: its files point into each other.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
from pydantic import BaseModel

from exporters.datafiles import BASE_DATA, SHARED, SharedWriter
from exporters.forms import FORMS
from exporters.forms.base import BuildContext
from exporters.loader import Loader
from exporters.onnx import OnnxExporter
from pipeline.core.compare import within
from pipeline.core.errors import TaskfoldError
from pipeline.core.io import atomic_dir, write_json


class CheckFailed(TaskfoldError, RuntimeError):
    """An exported file does not reproduce its reference within the run's checks."""


@dataclass(frozen=True)
class Thresholds:
    """What a form must meet on the test split (the config's ``checks`` section)."""

    max_abs_diff: float = 1e-2
    min_argmax_agree: float = 0.99
    max_accuracy_drop: float = 0.15

    def verdict(self, check: dict, lossy: bool) -> str | None:
        """None if ``check`` passes; else what failed (NaN never passes)."""
        if not check["max_abs_diff"] < float("inf"):
            return f"non-finite outputs (max |difference| {check['max_abs_diff']})"
        if lossy:
            if "accuracy" not in check:  # no labels (a bundle exported alone): changed classes bound the drop
                if not 1 - check["argmax_agree"] <= self.max_accuracy_drop:
                    return (f"argmax agreement {check['argmax_agree']:.4f} with FP32: more changed answers than "
                            f"checks.max_accuracy_drop {self.max_accuracy_drop:g} allows")
                return None
            drop = check["reference_accuracy"] - check["accuracy"]
            if not drop <= self.max_accuracy_drop:
                return (f"accuracy {check['reference_accuracy']:.4f} -> {check['accuracy']:.4f}, a drop beyond "
                        f"checks.max_accuracy_drop {self.max_accuracy_drop:g}")
            return None
        if not within(check, self.max_abs_diff):
            return (f"max |logit difference| {check['max_abs_diff']:.3g} > checks.onnx_max_abs_diff "
                    f"{self.max_abs_diff:g} x the largest logit {max(1.0, check.get('scale', 0.0)):.3g}")
        if not check["argmax_agree"] >= self.min_argmax_agree:
            return f"argmax agreement {check['argmax_agree']:.4f} < checks.min_argmax_agree {self.min_argmax_agree:g}"
        return None


def build_forms(exports: Path, exporter: OnnxExporter, forms: list[str], bundles: dict, images: dict,
                threads: int, options: dict[str, BaseModel] | None = None, log: Callable[[str], None] = print,
                thresholds: Thresholds = Thresholds()) -> dict:
    """``forms``: names from ``FORMS`` (merged is always built); ``bundles``: label -> Bundle whose
    merged models are already at ``<label>/<task>.onnx``; ``images[task]``: a ``TaskImages``.
    Every form is checked against its reference: an exact form that fails its ``thresholds`` is an
    error (a bug, nothing written), a lossy one (FP16, INT8) that loses too much is not shipped
    (its files removed, the reason in ``forms.json``). Returns ``{"forms": ..., "checks": ...,
    "seconds": {form: {"build": s, "check": s}}}``: where the time went, summed over the methods."""
    exports = Path(exports)
    asked = set(forms)
    for name in list(asked):  # a form is built from the forms it requires (bound from live): they come along
        asked |= set(FORMS[name].requires)
    if added := sorted(asked - set(forms)):
        log(f"export: also building {', '.join(added)}, which {', '.join(sorted(set(forms)))} are built from")
    wanted = ["merged"] + [f for f in FORMS if f in asked and f != "merged"]
    manifest: dict = {"methods": {}}
    seconds: dict[str, dict[str, float]] = defaultdict(lambda: {"build": 0.0, "check": 0.0})
    base = onnx.load(str(exports / "base.onnx"))
    with atomic_dir(exports / SHARED) as tmp:
        writer = SharedWriter(tmp, base)
        ctx = BuildContext(exports, writer, exporter, Loader(exports, threads, shared_dir=tmp), images,
                           dict(options or {}), log, forms=FORMS, workers=threads or os.cpu_count() or 1)
        manifest["base_data"] = {"file": f"{SHARED}/{BASE_DATA}", "bytes": writer.base_bytes}
        try:
            for label, bundle in bundles.items():
                ctx.bundle_base(bundle)
                specs = ctx.specs.setdefault(label, {})
                for name in wanted:
                    t0 = time.perf_counter()
                    specs[name] = _build_one(ctx, name, label, bundle, specs)
                    seconds[name]["build"] += time.perf_counter() - t0
                manifest["methods"][label] = specs
            manifest["extra_bases"] = {f"{SHARED}/{loc}": n for loc, n in writer.base_files.items()
                                       if loc != BASE_DATA}
            checks = _check_forms(ctx, manifest["methods"], thresholds, seconds)
        finally:
            ctx.close()
    write_json(exports / "forms.json", manifest)
    rounded = {n: {k: round(v, 2) for k, v in s.items()} for n, s in seconds.items()}
    return {"forms": manifest, "checks": checks, "seconds": rounded}


def _check_forms(ctx: BuildContext, methods: dict, thresholds: Thresholds, seconds: dict) -> dict:
    """Every built form against its reference, once the conversions it left to the worker
    processes are done (their seconds, summed over the workers, count as its build time: they
    overlap the other forms' builds). An exact form that fails is an error; a lossy one that
    fails is not shipped. Returns the checks."""
    checks = dict(ctx.checks)
    for key, check in ctx.checks.items():  # the branch graphs against torch
        if reason := thresholds.verdict(check, lossy=False):
            raise CheckFailed(f"{key}: {reason}")
    for label, specs in methods.items():
        for name, spec in list(specs.items()):
            if "unavailable" in spec:
                continue
            form = FORMS[name](ctx.options.get(name))
            seconds[name]["build"] += ctx.wait((label, name))
            t0 = time.perf_counter()
            found = form.check(ctx, label, spec)
            seconds[name]["check"] += time.perf_counter() - t0
            checks |= found
            failed = {k: r for k, c in found.items() if (r := thresholds.verdict(c, form.lossy))}
            if failed and not form.lossy:
                raise CheckFailed("; ".join(f"{k}: {r}" for k, r in failed.items()) + "; no form was written")
            if failed:
                for f in spec["files"]:
                    ctx.loader.path(f).unlink(missing_ok=True)
                specs[name] = {"unavailable": "failed its check: " + "; ".join(f"{k.split('/')[1]}: {r}"
                                                                              for k, r in failed.items())}
                ctx.log(f"  {label}/{name}: not shipped, {specs[name]['unavailable']}")
                continue
            spec["bytes"] = sum(ctx.loader.path(f).stat().st_size for f in spec["files"])
    return checks


def _build_one(ctx: BuildContext, name: str, label: str, bundle, built: dict) -> dict:
    form = FORMS[name](ctx.options.get(name))
    missing = [r for r in form.requires if r not in built or "unavailable" in built[r]]
    reason = form.applies(bundle) or (f"needs the {', '.join(missing)} form" if missing else None)
    if reason:
        return {"unavailable": reason}
    return form.build(ctx, label, bundle)
