"""The switch form's graph surgery: one graph for all tasks whose task-specific tensors are
graph *inputs* (with the base as default), plus one onnxruntime adapter file per task;
``RunOptions.add_active_adapter`` picks the task inside one session."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from exporters.datafiles import FormError, SharedWriter, initializer_arrays, tensor_key
from exporters.latency import runner


def write_switch(writer: SharedWriter, name: str, graphs: dict[str, onnx.ModelProto], defaults: onnx.ModelProto) -> dict:
    """One graph for all tasks, task-specific tensors as inputs, one adapter file per task.

    The graphs must differ only in initializer values (the same trace); a tensor is switched
    when its value differs between any two tasks. onnxruntime binds adapters to inputs that
    also have an initializer (a default): the default is the tensor in ``defaults`` (the
    base graph) where it has one of that name and shape, so it is shared with ``base.data``.
    Head shapes may differ between tasks: those dimensions become symbolic."""
    import onnxruntime as ort

    tasks = list(graphs)
    first = graphs[tasks[0]]
    for t in tasks[1:]:
        if _structure(graphs[t]) != _structure(first):
            raise FormError(f"task graphs differ in structure ({tasks[0]} vs {t}); one switchable graph "
                            "needs the same nodes for every task")
    values = {t: initializer_arrays(g) for t, g in graphs.items()}
    varying = [i.name for i in first.graph.initializer if len({tensor_key(values[t][i.name]) for t in tasks}) > 1]
    if not varying:
        raise FormError("all tasks have identical weights; nothing to switch")
    base = {i.name: i for i in defaults.graph.initializer}
    template = onnx.ModelProto()
    template.CopyFrom(first)
    shape_varies = False
    for init in template.graph.initializer:
        if init.name not in varying:
            continue
        shapes = {values[t][init.name].shape for t in tasks}
        shape_varies |= len(shapes) > 1
        if init.name in base and tuple(base[init.name].dims) == tuple(init.dims):
            init.CopyFrom(base[init.name])
        ref = values[tasks[0]][init.name]
        dims = [d if len({s[i] for s in shapes}) == 1 else f"{init.name}_dim{i}" for i, d in enumerate(ref.shape)]
        template.graph.input.append(
            helper.make_tensor_value_info(init.name, helper.np_dtype_to_tensor_dtype(ref.dtype), dims))
    if shape_varies:
        del template.graph.value_info[:]
        for out in template.graph.output:
            for i, d in enumerate(out.type.tensor_type.shape.dim):
                if i > 0 and d.HasField("dim_value"):
                    d.dim_param = f"{out.name}_dim{i}"
    info = writer.write_graph(f"{name}.switch", template)
    adapters = {}
    for t in tasks:
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(1)
        fmt.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(values[t][n]))
                            for n in varying})
        rel = f"{name}.{t}.onnx_adapter"
        fmt.export_adapter(str(writer.out / rel))
        adapters[t] = {"file": rel, "bytes": (writer.out / rel).stat().st_size}
    return {**info, "inputs": varying, "adapters": adapters}


def _structure(model: onnx.ModelProto) -> list[bytes]:
    """The graph without initializer values: nodes, and initializer names."""
    g = model.graph
    return [n.SerializeToString() for n in g.node] + [i.name.encode() for i in g.initializer]


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
