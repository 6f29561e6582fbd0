"""The contract every deployment form keeps, and what building one can use.

A form turns a run's merged per-task models (and its bundles) into the files a device stores
for K tasks. Each is one module with:

* ``name``, ``note`` (one line for the report), ``Options`` (its config section, or None),
  ``requires`` (forms it is built from), ``reference`` (what its outputs are checked against);
* ``applies(bundle)``: None, or why the form has nothing to offer for this bundle;
* ``build(ctx, label, bundle)``: write the files, return the spec ``forms.json`` lists
  (``tasks``: task -> file, ``files``: everything a device needs);
* ``targets(loader, spec)``: task -> ``x -> outputs``, what the bench times and the check runs;
* ``bring_up(loader, spec, task)``: a task from its files to a callable (the switch time).

``check`` is the same for every form: its targets against the reference on the test split.
"""
from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import onnx
from pydantic import BaseModel

from exporters.datafiles import EXTRA_BASES, SHARED, SharedWriter
from exporters.images import TaskImages, logits
from exporters.latency import runner
from exporters.loader import Loader
from exporters.onnx import OnnxExporter, base_model
from pipeline.core.compare import compare_logits
from pipeline.core.io import temp_dir


@dataclass
class BuildContext:
    """One exports folder being built; ``images[task]``: what the forms are checked on."""

    exports: Path
    writer: SharedWriter  # writes into the shared folder while it is a temp folder
    exporter: OnnxExporter
    loader: Loader  # reads that temp folder too
    images: dict[str, TaskImages]
    options: dict[str, BaseModel] = field(default_factory=dict)
    log: Callable[[str], None] = print
    specs: dict[str, dict[str, dict]] = field(default_factory=dict)  # label -> form -> spec built so far
    graphs: dict[tuple[str, str], dict[str, onnx.ModelProto]] = field(default_factory=dict)  # (label, form) -> graphs
    checks: dict[str, dict] = field(default_factory=dict)  # checks a form makes while building (branch vs torch)
    forms: dict[str, type] = field(default_factory=dict)  # the registry, for forms checked against another form
    workers: int = 1  # processes for conversions that are independent per task (INT8, FP16)
    _pool: ProcessPoolExecutor | None = None
    _background: dict[tuple[str, str], list[Future]] = field(default_factory=dict)  # (label, form) -> conversions
    _bases: dict[str, onnx.ModelProto] = field(default_factory=dict)
    _logits: dict[tuple[str, str, bool], np.ndarray] = field(default_factory=dict)

    def merged_graphs(self, label: str, tasks: list[str]) -> dict[str, onnx.ModelProto]:
        if (label, "merged") not in self.graphs:
            self.graphs[label, "merged"] = {t: onnx.load(str(self.exports / label / f"{t}.onnx")) for t in tasks}
        return self.graphs[label, "merged"]

    def merged_logits(self, label: str, task: str, exact: bool = False) -> np.ndarray:
        """The merged model's test logits, the reference of every other form, each image run once
        (``exact``: the images of the exact checks, the first of the split; else all of them)."""
        key = (label, task, exact)
        if key not in self._logits:
            images, run = self.images[task], runner(self.loader.open(f"{label}/{task}.onnx"))
            first = self._logits.get((label, task, True))
            if first is None:
                first = self._logits[label, task, True] = logits(run, images.exact_batches())
            if not exact:
                rest = (run(np.ascontiguousarray(x, dtype=np.float32))[0] for x in images.rest_batches())
                self._logits[key] = np.concatenate([first, *rest])
        return self._logits[key]

    def map(self, fn: Callable, *args: list) -> list:
        """``fn`` over the argument lists, in order, in up to ``workers`` processes (started once per
        build, spawned: the parent's thread pools do not survive a fork). Quantising a model is
        mostly single-threaded Python (onnxruntime's quantiser), so on 2 cores two at a time take
        about half the time. ``fn`` must be a module-level function."""
        if self._here(args):
            return [fn(*a) for a in zip(*args)]
        return list(self._processes().map(fn, *args))

    def submit(self, key: tuple[str, str], fn: Callable, *args: list) -> None:
        """``map`` without waiting: the conversions of form ``key`` = (label, form) run in the worker
        processes while this one builds the other forms (much of which is single-threaded Python:
        tracing, graph rewriting), and ``wait(key)`` collects them before that form is checked.
        With one worker they run here, now."""
        jobs = self._background.setdefault(key, [])
        if self._here(args):
            for a in zip(*args):
                done = Future()
                done.set_result(_timed(fn, *a))  # an error is raised here, as from ``map``
                jobs.append(done)
            return
        pool = self._processes()
        jobs.extend(pool.submit(_timed, fn, *a) for a in zip(*args))

    def wait(self, key: tuple[str, str]) -> float:
        """Until form ``key``'s conversions are done (the first one's error, if one failed); the
        seconds they took, summed over the processes that ran them."""
        return sum(job.result() for job in self._background.pop(key, []))

    def _here(self, args: tuple[list, ...]) -> bool:
        """Run in this process: one worker, or one call (a process would only cost its start)."""
        return self.workers <= 1 or len(args[0]) <= 1

    def _processes(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def close(self) -> None:
        """Stop the worker processes: conversions not started are dropped, running ones finish
        (each writes its file whole or not at all)."""
        self._background.clear()
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def bundle_base(self, bundle) -> onnx.ModelProto:
        """The bundle's base as a graph, registered with the writer once per distinct base file.
        A jointly trained base differs from the pretrained one: its tensors go to
        ``bases/<sha>.data``, so its tasks share it as the others share ``base.data``."""
        sha = bundle.manifest["files"]["base.safetensors"]["sha256"]
        if sha not in self._bases:
            info = bundle.manifest["backbone"]
            classes = next(iter(bundle.manifest["tasks"].values()))["num_classes"]
            model = base_model(bundle.base.features, info["num_features"], classes)
            with temp_dir(self.exports / "base.onnx") as d:
                self._bases[sha] = onnx.load(str(self.exporter.export(model, Path(d) / "base.onnx")))
            added = self.writer.add_base(f"{EXTRA_BASES}/{sha[:16]}.data", self._bases[sha])
            if added:
                self.log(f"  {bundle.root.name}: a base of its own, {added:,} bytes not in base.data, shared by its tasks")
        return self._bases[sha]


def _timed(fn: Callable, *args) -> float:
    """Run ``fn`` (in a worker process); the seconds it took."""
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def copy_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


class Form:
    name: ClassVar[str]
    note: ClassVar[str]
    Options: ClassVar[type[BaseModel] | None] = None
    requires: ClassVar[tuple[str, ...]] = ()
    reference: ClassVar[str] = "merged"
    # True: the check also reports accuracy against the reference's (lossy edge variants)
    lossy: ClassVar[bool] = False
    # True: one session serves every task, so, alone in a process, its thread pool may spin
    # between requests (onnxruntime's default). A session per task must not: idle pools that
    # spin take the cores from the one that runs (see ``exporters.bench._probe``)
    one_session: ClassVar[bool] = False
    # True: built for the CPU it was exported on (the bench leaves it out on a GPU provider)
    cpu_only: ClassVar[bool] = False

    def __init__(self, options: BaseModel | None = None):
        self.options = options if options is not None else (self.Options() if self.Options else None)

    def applies(self, bundle) -> str | None:
        return None

    def build(self, ctx: BuildContext, label: str, bundle) -> dict:
        raise NotImplementedError

    def targets(self, loader: Loader, spec: dict) -> dict[str, Callable]:
        """task -> ``x -> outputs``: one session per task file (sharing base weights if the spec does)."""
        return {t: runner(loader.open(rel, spec.get("shared_weights", False))) for t, rel in spec["tasks"].items()}

    def bring_up(self, loader: Loader, spec: dict, task: str, resident=None) -> Callable:
        """A task brought up from its files (``resident``: what the form keeps loaded between tasks)."""
        return runner(loader.open(spec["tasks"][task], spec.get("shared_weights", False)))

    def resident(self, loader: Loader, spec: dict):
        """What stays loaded while tasks are switched (the switch form's one session), or None."""
        return None

    def check(self, ctx: BuildContext, label: str, spec: dict) -> dict[str, dict]:
        """Every task's outputs against the reference form's: on the exact checks' test images,
        or, for a lossy form, on the whole test split with its accuracy."""
        got = self.targets(ctx.loader, spec)
        ref = None if self.reference == "merged" else ctx.forms[self.reference]().targets(
            ctx.loader, ctx.specs[label][self.reference])
        out = {}
        for task, fn in got.items():
            images = ctx.images[task]
            batches = images.batches if self.lossy else images.exact_batches
            expected = ctx.merged_logits(label, task, not self.lossy) if ref is None else logits(ref[task], batches())
            out[f"{label}/{task}/{self.name}"] = compare_logits(expected, logits(fn, batches()),
                                                                images.labels if self.lossy else None)
        return out


def sessions_spec(files: dict[str, str], shared: bool, listed: list[str] | None = None) -> dict:
    """The spec of a form that runs one session per task file."""
    return {"kind": "sessions", "shared_weights": shared, "tasks": files,
            "files": sorted(set(files.values()) | set(listed or []))}


def shared_spec(ctx: BuildContext, name: str, graphs: dict[str, onnx.ModelProto]) -> dict:
    """Write each task's graph into the shared folder (base weights pointing into the base files)."""
    files, detail = {}, {}
    for t, g in graphs.items():
        detail[t] = ctx.writer.write_graph(f"{name}.{t}", copy_graph(g))
        files[t] = f"{SHARED}/{name}.{t}.onnx"
    listed = sorted({f"{SHARED}/{f}" for i in detail.values() for f in i["files"]})
    return {**sessions_spec(files, True, listed), "detail": detail}
