"""live: one onnxruntime session per method on a graph onnxruntime already optimised for this
CPU (``shared/<label>.live.onnx``), and per task the tensors in which tasks differ
(``shared/<label>.live.<task>.safetensors``). A task switch reads the task's tensors from its
file into the live session's weight buffers: no new session, and the session runs the merged
model's own optimised kernels, so it answers at merged latency.

How it works: onnxruntime's optimiser (level ALL) rewrites a merged model into blocked-layout
(NCHWc) convolutions with reordered weights, per CPU. That rewritten graph is saved once per
task; the graphs of a method's tasks have the same nodes and differ only in tensor values. The
session loads the first task's graph with every rewrite off and weight prepacking off, and takes
the tensors that differ from buffers taskfold owns (``add_initializer``; onnxruntime does not
copy them), so writing into the buffers changes the model it runs.

Two consequences a user should know:

* the files are for the CPU (instruction set) and onnxruntime version they were built with; on
  another one, loading is refused with both named (rebuild with ``taskfold export``);
* folding BatchNorm into the convs (a rewrite the optimiser does) makes every conv of a
  norm-trained task differ, but only by a scale per output channel: a task file then holds the
  scales (``channel_scales``) and a switch rebuilds the convs from the graph's base copy (read
  from its data file into the session's buffers, then scaled), so norm_head and TAPS run the
  merged kernels from norm-sized files. A switch then writes every conv (slower than reading a
  few norms), and ``bound``, which holds every task's tensors, holds every task's convs.
  ``fuse_norms: never`` keeps norms apart instead, as 1x1 depthwise convs
  (``norms_as_depthwise``): tasks switch only their norms, at some latency.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

import numpy as np
import onnx
from onnx import numpy_helper
from pydantic import BaseModel, ConfigDict
from safetensors.numpy import save_file

from exporters import channel_scales
from exporters.channel_scales import SUFFIX
from exporters.datafiles import SHARED, FormError, initializer_arrays, move_out, set_external
from exporters.forms.base import BuildContext, Form, copy_graph
from exporters.live_files import cpu_signature, safetensors_offsets
from exporters.live_session import LiveSession
from exporters.loader import Loader
from exporters.runtime import onnxruntime
from pipeline.core.io import atomic_path, temp_dir

NORM_FUSION = "ConvBNFusion"  # onnxruntime's rewrite rule that folds BatchNormalization into a Conv


class LiveOptions(BaseModel):
    """``export.live``: whether BatchNorm is folded into the convs of the live graph (merged
    latency; a norm-trained task's convs are rebuilt from per-channel scales at each switch, and
    ``bound`` holds each task's convs) or kept apart as depthwise convs (tasks switch only their
    norms, slower); ``auto`` folds unless that more than doubles a task's file."""

    fuse_norms: Literal["auto", "always", "never"] = "auto"
    model_config = ConfigDict(extra="forbid")


def optimise(src: Path, dst: Path, fuse_norms: bool) -> onnx.ModelProto:
    """``src`` as onnxruntime's level-ALL optimiser rewrites it for this CPU, saved to ``dst``."""
    ort = onnxruntime()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(dst)
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"],
                         disabled_optimizers=[] if fuse_norms else [NORM_FUSION])
    return onnx.load(str(dst))


def norms_as_depthwise(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each BatchNormalization that follows a 2-D conv (its four tensors constant)
    replaced by the same per-channel affine as a 1x1 depthwise conv, the way the live graph keeps
    norms out of the convs. onnxruntime runs an unfused BatchNorm outside its blocked (NCHWc)
    layout: the activation after it cannot join a conv, and each costs a layout round trip
    (norm_head 1.5-1.8x merged latency here); as a depthwise conv it stays blocked with the
    activation fused (1.2-1.3x), and its two tensors are as small as the norm's four."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes, added = [], []
    for n in model.graph.node:
        conv = producer.get(n.input[0]) if n.op_type == "BatchNormalization" else None
        weight = inits.get(conv.input[1]) if conv is not None and conv.op_type == "Conv" else None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        params = [inits.get(name) for name in n.input[1:5]]
        if weight is None or len(weight.dims) != 4 or None in params or len(n.output) != 1 or attrs.get("training_mode"):
            nodes.append(n)
            continue
        scale, shift, mean, var = (numpy_helper.to_array(t).astype(np.float64) for t in params)
        mul = scale / np.sqrt(var + attrs.get("epsilon", 1e-5))
        w, b = f"{n.output[0]}.norm_weight", f"{n.output[0]}.norm_bias"
        added += [numpy_helper.from_array(mul.reshape(-1, 1, 1, 1).astype(np.float32), w),
                  numpy_helper.from_array((shift - mean * mul).astype(np.float32), b)]
        nodes.append(onnx.helper.make_node("Conv", [n.input[0], w, b], list(n.output), name=f"{n.name}.depthwise",
                                           group=len(mul), kernel_shape=[1, 1]))
    out = copy_graph(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [i for i in model.graph.initializer if i.name in used] + added
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


def _structure(model: onnx.ModelProto) -> list:
    return [(n.op_type, n.domain, tuple(n.input), tuple(n.output)) for n in model.graph.node]


def task_graphs(ctx: BuildContext, label: str, tasks: list[str], fuse_norms: bool, where: Path):
    """Each task's optimised graph (norms folded into the convs, or as depthwise convs), and the
    names of the float tensors in which any two differ."""
    graphs = {}
    for t in tasks:
        src = ctx.exports / label / f"{t}.onnx"
        if not fuse_norms:
            onnx.save_model(norms_as_depthwise(onnx.load(str(src))), str(where / f"{t}.depthwise.onnx"))
            src = where / f"{t}.depthwise.onnx"
        graphs[t] = optimise(src, where / f"{t}.{int(fuse_norms)}.onnx", fuse_norms)
    first = graphs[tasks[0]]
    for t in tasks[1:]:
        if _structure(graphs[t]) != _structure(first):
            raise FormError(f"the optimised graphs of {tasks[0]} and {t} differ in structure; one live session "
                            "needs the same nodes for every task")
    values = {t: initializer_arrays(g) for t, g in graphs.items()}
    ref = values[tasks[0]]
    switched = sorted(k for k, v in ref.items() if any(not np.array_equal(values[t][k], v) for t in tasks[1:]))
    for k in switched:  # a switch copies values; it cannot change a shape, or the graph's integer constants
        for t in tasks[1:]:
            got = values[t][k]
            if got.shape != ref[k].shape or got.dtype != ref[k].dtype or got.dtype.kind != "f":
                raise FormError(f"tensor {k!r} is {got.dtype}{list(got.shape)} in {t} but {ref[k].dtype}"
                                f"{list(ref[k].shape)} in {tasks[0]}; a live switch only copies float values of one shape")
    return graphs, values, switched


def task_tensors(values: dict, switched: list[str], tasks: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Per task the tensors its file holds: each switched tensor whole, or, where every task's is
    the first task's scaled per output channel (a folded norm on a shared conv), only its scales
    as ``name + SUFFIX`` (``channel_scales``; the first task's tensor is the base the graph keeps)."""
    stored: dict[str, dict[str, np.ndarray]] = {t: {} for t in tasks}
    for k in switched:
        scales = channel_scales.fit([values[t][k] for t in tasks])
        for i, t in enumerate(tasks):
            if scales is None:
                stored[t][k] = np.ascontiguousarray(values[t][k])
            else:
                stored[t][k + SUFFIX] = scales[i]
    return stored


def point_into(model: onnx.ModelProto, task_file: Path, names: set[str]) -> onnx.ModelProto:
    """The graph with its switched tensors read from the first task's file (ONNX external data at
    the tensors' offsets), so the files hold them once per task, not once more in the graph. The
    other tensors go to the graph's own data file (``move_out``), so a session can be made from
    the small graph with its tensors handed over apart (``BoundSession``)."""
    offsets = safetensors_offsets(task_file)
    for init in model.graph.initializer:
        if init.name in names:
            set_external(init, task_file.name, *offsets[init.name])
    return model


class Live(Form):
    name = "live"
    note = "one session on a graph pre-optimised for this CPU; a switch copies the task's tensors in"
    Options = LiveOptions
    cpu_only = True
    session = LiveSession  # how the files run (``exporters.forms.bound`` runs them another way)
    one_session = True

    def build(self, ctx: BuildContext, label: str, bundle) -> dict:
        tasks = list(bundle.tasks)
        choice = self.options.fuse_norms
        with temp_dir(ctx.writer.out / f"{label}.live.tmp") as d:
            built = {}
            try:
                for fuse in ((True, False) if choice == "auto" else (choice == "always",)):
                    graphs, values, switched = task_graphs(ctx, label, tasks, fuse, Path(d))
                    built[fuse] = (graphs[tasks[0]], task_tensors(values, switched, tasks))
            except FormError as err:
                ctx.log(f"  {label}: no live form: {err}")
                return {"kind": "live", "unavailable": str(err)}
            fuse = self._pick(built)
            graph0, stored = built[fuse]
            whole = {k for k in stored[tasks[0]] if not k.endswith(SUFFIX)}  # switched tensors the files hold whole
            files = {}
            for t in tasks:
                files[t] = f"{label}.live.{t}.safetensors"
                with atomic_path(ctx.writer.out / files[t]) as tmp:
                    save_file(stored[t], str(tmp))
            graph, data = f"{label}.live.onnx", f"{label}.live.data"
            model = point_into(graph0, ctx.writer.out / files[tasks[0]], whole)
            own = [data] if move_out(model, ctx.writer.out / data, whole) else []  # the rest, scaled bases included
            with atomic_path(ctx.writer.out / graph) as tmp:
                onnx.save_model(model, str(tmp))
        stored0 = stored[tasks[0]]
        return {"kind": "live", "graph": f"{SHARED}/{graph}", "tasks": {t: f"{SHARED}/{f}" for t, f in files.items()},
                "files": sorted(f"{SHARED}/{f}" for f in [graph, *own, *files.values()]),
                "switched_tensors": len(stored0), "switched_bytes": sum(a.nbytes for a in stored0.values()),
                "scaled_tensors": len(stored0) - len(whole), "fused_norms": fuse, "built_on": cpu_signature()}

    def _pick(self, built: dict) -> bool:
        """Fold norms into convs (merged kernels) unless that doubles or more the per-task tensors."""
        if len(built) == 1:
            return next(iter(built))
        size = {fuse: sum(a.nbytes for a in next(iter(files.values())).values()) for fuse, (_, files) in built.items()}
        return size[True] <= 2 * size[False]

    def resident(self, loader: Loader, spec: dict):
        return self.session(loader.path(spec["graph"]), {t: loader.path(f) for t, f in spec["tasks"].items()},
                            spec.get("built_on", {}), loader.threads, loader.providers, loader.spinning)

    def targets(self, loader: Loader, spec: dict) -> dict[str, Callable]:
        live = self.resident(loader, spec)
        return {t: live.runner(t) for t in spec["tasks"]}

    def bring_up(self, loader: Loader, spec: dict, task: str, resident=None) -> Callable:
        """The task's runner; its first call makes the switch (a live session reads the task's file)."""
        return (resident if resident is not None else self.resident(loader, spec)).runner(task)
