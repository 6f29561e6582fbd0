"""Every deployable form of a run's bundles, written next to the merged ONNX models, and
``forms.json``: for each method and form, the files a device needs for its K tasks.

Forms (``export.forms`` in the config picks them):

=============  ==================================================================================
merged         ``<label>/<task>.onnx``: one self-contained plain model per task (always written)
shared         ``shared/<label>.<task>.onnx`` (+ ``.data``): weights point into ``shared/base.data``
               (the base, once; a jointly trained base adds ``shared/bases/<sha>.data``) or the
               task's own data file; sessions share the base in memory
switch         ``shared/<label>.switch.onnx`` + ``<label>.<task>.onnx_adapter``: one session, the
               task picked per request by an onnxruntime adapter
branch         low-rank deltas as side branches on the untouched base layers, in the shared and
               switch packagings (``<label>.branch.*``); only for bundles with such deltas
fp16, int8     ``<label>/<task>.fp16.onnx`` / ``.int8.onnx``: edge variants of the merged model
=============  ==================================================================================

Each form is checked against the merged model in onnxruntime on the task's test images.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from exporters.forms import BASE_DATA, EXTRA_BASES, FormError, SharedWeights, SharedWriter, to_fp16, to_int8
from exporters.latency import runner
from exporters.onnx import OnnxExporter, base_model, parity, session
from pipeline.config import Int8Recipe
from pipeline.io import atomic_dir, write_json

FORMS = ("shared", "switch", "branch", "fp16", "int8")
SHARED = "shared"


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def batched_logits(target, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Logits of a session or a ``runner``/``AdapterTarget`` over ``x`` in batches."""
    fn = target if callable(target) else runner(target)
    return np.concatenate([fn(x[i : i + batch])[0] for i in range(0, len(x), batch)])


def compare_logits(ref: np.ndarray, got: np.ndarray, labels: np.ndarray | None = None) -> dict:
    out = {"max_abs_diff": float(np.abs(ref - got).max()),
           "argmax_agree": float((ref.argmax(1) == got.argmax(1)).mean()), "images": len(ref)}
    if labels is not None:
        out["accuracy"] = float((got.argmax(1) == labels).mean())
        out["reference_accuracy"] = float((ref.argmax(1) == labels).mean())
    return out


class AdapterTarget:
    """A switch-form session with one task's adapter file loaded and active: ``x -> outputs``.
    Holds the adapter, which must outlive the run options that point to it."""

    def __init__(self, sess, path: Path):
        import onnxruntime as ort

        self.adapter = ort.LoraAdapter()
        self.adapter.Load(str(path))
        self.options = ort.RunOptions()
        self.options.add_active_adapter(self.adapter)
        self.run = runner(sess, self.options)

    def __call__(self, x: np.ndarray):
        return self.run(x)


class FormBuilder:
    """Builds the forms of one run's exports folder. ``images[task]`` = (calibration images,
    test images, test labels), normalised float32 arrays."""

    def __init__(self, exports: Path, exporter: OnnxExporter, forms: list[str], threads: int,
                 log: Callable[[str], None] = print, int8: Int8Recipe = Int8Recipe()):
        self.exports = Path(exports)
        self.exporter = exporter
        self.forms = [f for f in FORMS if f in forms]
        self.threads = threads
        self.log = log
        self.int8 = int8
        self._merged_logits: dict[tuple[str, str], np.ndarray] = {}

    def merged_logits(self, label: str, task: str, x: np.ndarray) -> np.ndarray:
        """The merged model's test logits, the reference of every other form: computed once."""
        if (label, task) not in self._merged_logits:
            path = self.exports / label / f"{task}.onnx"
            self._merged_logits[label, task] = batched_logits(session(path, self.threads), x)
        return self._merged_logits[label, task]

    def build(self, bundles: dict, images: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict:
        manifest: dict = {"methods": {}}
        checks: dict = {}
        base = onnx.load(str(self.exports / "base.onnx"))
        with atomic_dir(self.exports / SHARED) as tmp:
            writer = SharedWriter(tmp, base)
            manifest["base_data"] = {"file": f"{SHARED}/{BASE_DATA}", "bytes": writer.base_bytes}
            bases: dict[str, onnx.ModelProto] = {}
            for label, bundle in bundles.items():
                own_base = self._bundle_base(writer, bundle, bases)
                manifest["methods"][label] = self._method(writer, tmp, label, bundle, own_base, images, checks)
            manifest["extra_bases"] = {f"{SHARED}/{loc}": n for loc, n in writer.base_files.items() if loc != BASE_DATA}
            # checks read the shared folder where it is being written; it moves into place after
            self._check_shared(tmp, manifest, images, checks)
        write_json(self.exports / "forms.json", manifest)
        return {"forms": manifest, "checks": checks}

    def _bundle_base(self, writer: SharedWriter, bundle, bases: dict[str, onnx.ModelProto]) -> onnx.ModelProto:
        """The bundle's base as a graph, registered with the writer once per distinct base file.
        A jointly trained base differs from the pretrained one: its tensors go to
        ``bases/<sha>.data``, so its tasks share it as the others share ``base.data``."""
        sha = bundle.manifest["files"]["base.safetensors"]["sha256"]
        if sha not in bases:
            info = bundle.manifest["backbone"]
            classes = next(iter(bundle.manifest["tasks"].values()))["num_classes"]
            model = base_model(bundle.base.features, info["num_features"], classes)
            with tempfile.TemporaryDirectory() as d:
                bases[sha] = onnx.load(str(self.exporter.export(model, Path(d) / "base.onnx")))
            added = writer.add_base(f"{EXTRA_BASES}/{sha[:16]}.data", bases[sha])
            if added:
                self.log(f"  {bundle.root.name}: a base of its own, {added:,} bytes not in base.data, shared by its tasks")
        return bases[sha]

    def _method(self, writer: SharedWriter, tmp: Path, label: str, bundle, base, images, checks) -> dict:
        tasks = bundle.tasks
        merged = {t: onnx.load(str(self.exports / label / f"{t}.onnx")) for t in tasks}
        out = {"merged": self._sessions({t: f"{label}/{t}.onnx" for t in tasks}, shared=False)}
        if "shared" in self.forms:
            out["shared"] = self._shared(writer, label, merged)
        if "switch" in self.forms:
            out["switch"] = self._switch(writer, label, merged, base)
        if "branch" in self.forms and bundle.has_branches():
            graphs = self._branch_graphs(bundle, label, images, checks)
            out["branch"] = self._shared(writer, f"{label}.branch", graphs)
            if "switch" in self.forms:
                out["branch_switch"] = self._switch(writer, f"{label}.branch", graphs, base)
        for variant in ("fp16", "int8"):
            if variant in self.forms:
                out[variant] = self._edge(label, tasks, variant, images, checks)
        return out

    def _sessions(self, files: dict[str, str], shared: bool, extra: list[str] = ()) -> dict:
        listed = sorted(set(files.values()) | set(extra))
        return {"kind": "sessions", "shared_weights": shared, "tasks": files, "files": listed,
                "bytes": sum((self.exports / f).stat().st_size for f in listed)}

    def _shared(self, writer: SharedWriter, name: str, graphs: dict[str, onnx.ModelProto]) -> dict:
        files, detail = {}, {}
        for t, g in graphs.items():
            info = writer.write_graph(f"{name}.{t}", _copy(g))
            files[t] = f"{SHARED}/{name}.{t}.onnx"
            detail[t] = info
        listed = sorted({f"{SHARED}/{f}" for i in detail.values() for f in i["files"]})
        return {"kind": "sessions", "shared_weights": True, "tasks": files, "files": listed, "detail": detail}

    def _switch(self, writer: SharedWriter, name: str, graphs: dict[str, onnx.ModelProto], base) -> dict:
        try:
            info = writer.write_switch(name, {t: _copy(g) for t, g in graphs.items()}, base)
        except FormError as err:
            self.log(f"  {name}: no switch form: {err}")
            return {"kind": "adapters", "unavailable": str(err)}
        files = [f"{SHARED}/{f}" for f in info["files"]]
        adapters = {t: f"{SHARED}/{a['file']}" for t, a in info["adapters"].items()}
        return {"kind": "adapters", "graph": f"{SHARED}/{name}.switch.onnx", "tasks": adapters,
                "files": sorted(set(files) | set(adapters.values())), "switched_tensors": len(info["inputs"])}

    def _branch_graphs(self, bundle, label: str, images, checks) -> dict[str, onnx.ModelProto]:
        """Export each task with its low-rank deltas as side branches; check it against torch."""
        graphs = {}
        with tempfile.TemporaryDirectory() as d:
            for t in bundle.tasks:
                model = bundle.merged(t, branches=True)
                path = self.exporter.export(model, Path(d) / f"{t}.onnx")
                check = parity(model, session(path, self.threads), torch.from_numpy(images[t][1]))
                checks[f"{label}/{t}/branch_torch"] = check
                graphs[t] = onnx.load(str(path))
        return graphs

    def _edge(self, label: str, tasks: list[str], variant: str, images, checks) -> dict:
        files = {}
        for t in tasks:
            src = self.exports / label / f"{t}.onnx"
            rel = f"{label}/{t}.{variant}.onnx"
            if variant == "fp16":
                to_fp16(src, self.exports / rel)
            else:
                to_int8(src, self.exports / rel, images[t][0], recipe=self.int8)
            files[t] = rel
            _, x, y = images[t]
            checks[f"{label}/{t}/{variant}"] = compare_logits(
                self.merged_logits(label, t, x), batched_logits(session(self.exports / rel, self.threads), x), y)
        return self._sessions(files, shared=False)

    def _check_shared(self, folder: Path, manifest: dict, images, checks) -> None:
        """Every shared and switch form against its merged (or branch) reference in onnxruntime."""
        weights = SharedWeights(folder)
        for label, forms in manifest["methods"].items():
            for form, spec in forms.items():
                if form in ("merged", "fp16", "int8") or "unavailable" in spec:
                    continue
                ref_form = "branch" if form == "branch_switch" else "merged"
                if spec["kind"] == "adapters":
                    graph = folder / Path(spec["graph"]).name
                    sess = session(graph, self.threads, initializers=weights.initializers(graph))
                for t, rel in spec["tasks"].items():
                    x = images[t][1]
                    if ref_form == "merged":
                        ref = self.merged_logits(label, t, x)
                    else:
                        g = folder / Path(forms["branch"]["tasks"][t]).name
                        ref = batched_logits(session(g, self.threads, initializers=weights.initializers(g)), x)
                    path = folder / Path(rel).name
                    if spec["kind"] == "adapters":
                        got = batched_logits(AdapterTarget(sess, path), x)
                    else:
                        got = batched_logits(session(path, self.threads, initializers=weights.initializers(path)), x)
                    checks[f"{label}/{t}/{form}"] = compare_logits(ref, got)
                spec["bytes"] = sum((folder / Path(f).relative_to(SHARED)).stat().st_size if f.startswith(f"{SHARED}/")
                                    else (self.exports / f).stat().st_size for f in spec["files"])
