"""The runtime side of the live graph (``exporters.forms.live`` builds it): one onnxruntime
session on a graph optimised for this CPU, and per task a file of the tensors in which tasks
differ. Two ways to run it, one per form:

* ``LiveSession`` (form ``live``): the switched tensors live in buffers taskfold owns, and a
  switch reads the task's file into them, so the process holds one set of task tensors;
* ``BoundSession`` (form ``bound``): the switched tensors are graph inputs, every task's are read
  once and bound to the session per task (IOBinding), so a switch copies nothing.

Both check every task file's layout against the graph when they open, and the graph's CPU
signature against this machine's (``exporters.live_files.LiveFiles``)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from exporters.live_files import LiveFiles, graph_tensors
from exporters.runtime import onnxruntime


def session_options(threads: int, spinning: bool = False):
    """The graph is optimised already, and kernels must read the tensors taskfold hands them
    (a prepacked copy would not follow a switch). ``spinning``: the thread pool spin-waits
    between runs, as onnxruntime does by default; right for this one session alone in a
    process, wrong beside other sessions (``exporters.runtime.session``)."""
    ort = onnxruntime()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


class LiveSession:
    """The session and the buffers it reads its switched tensors from; ``use(task)`` reads a
    task's tensors from its file into them. Task tensors are not kept in memory (the files are:
    the OS caches them): 4 finetune tasks would hold 54 MB."""

    def __init__(self, graph: Path, task_files: dict[str, Path], built_on: dict, threads: int,
                 providers: list[str] | None = None, spinning: bool = False):
        self.files = LiveFiles(graph, task_files, built_on, providers)
        self.buffers = self.files.empty()
        self.active: str | None = None
        self.use(self.files.first)
        ort = onnxruntime()
        opts = session_options(threads, spinning)
        self._values = {k: ort.OrtValue.ortvalue_from_numpy(b) for k, b in self.buffers.items()}
        for k, v in self._values.items():
            opts.add_initializer(k, v)  # onnxruntime reads these buffers in place
        self.session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def use(self, task: str) -> None:
        if task != self.active:
            self.active = None  # a read that fails half-way leaves mixed buffers: the next use reads all again
            self.files.read(task, self.buffers)
            self.active = task

    def runner(self, task: str) -> Callable:
        def run(x):
            self.use(task)
            return self.session.run(None, {self.input: x})

        return run


class BoundSession:
    """One session on the live graph with its switched tensors turned into graph inputs, and
    every task's tensors read once (the files may change or go afterwards) and bound to the
    session in an IOBinding per task. A switch picks another binding: nothing is copied and no
    session is made, so the first answer of a task costs what any answer does. The process holds
    every task's tensors (4 finetune tasks: 54 MB), which ``LiveSession`` does not."""

    def __init__(self, graph: Path, task_files: dict[str, Path], built_on: dict, threads: int,
                 providers: list[str] | None = None, spinning: bool = False):
        ort = onnxruntime()
        files = LiveFiles(graph, task_files, built_on, providers)
        proto = onnx.load(str(graph), load_external_data=False)  # small: its tensors are in data files
        moved = [i for i in proto.graph.initializer if i.name in files.names]
        kept = [i for i in proto.graph.initializer if i.name not in files.names]
        self.input = proto.graph.input[0].name
        self.outputs = [o.name for o in proto.graph.output]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
        proto.graph.input.extend(onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in moved)
        opts = session_options(threads, spinning)
        fixed = graph_tensors(graph, files.data, [i for i in kept if i.data_location == onnx.TensorProto.EXTERNAL])
        if fixed:  # onnxruntime copies them; a model made from bytes cannot read files itself
            opts.add_external_initializers(list(fixed), [ort.OrtValue.ortvalue_from_numpy(a) for a in fixed.values()])
        # onnxruntime's Python session keeps the bytes it was made from: they hold no tensor data
        self.session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        del proto, moved, kept, fixed
        self.tensors: dict[str, dict[str, np.ndarray]] = {}
        self.bindings = {}
        for task in files.files:  # the files (and scaled tensors' bases) are not needed afterwards
            arrays = files.empty()
            files.read(task, arrays)
            binding = self.session.io_binding()
            for k, a in arrays.items():
                binding.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(a))  # no copy: the arrays stay
            self.tensors[task], self.bindings[task] = arrays, binding

    def runner(self, task: str) -> Callable:
        binding = self.bindings[task]

        def run(x):
            binding.bind_cpu_input(self.input, np.ascontiguousarray(x, dtype=np.float32))
            for name in self.outputs:
                binding.bind_output(name)
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()

        return run
