"""The live form's runtime side: one onnxruntime session on a graph optimised for this CPU, whose
switched tensors live in buffers taskfold owns, and the task files a switch reads into them
(``exporters.forms.live`` builds both). A switch reads from the file, so no task's tensors are
held in the process; every task file's layout is checked against the graph when the session
opens, and the graph's CPU signature against this machine's."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from exporters.datafiles import FormError, external_info
from exporters.runtime import onnxruntime

CPU_FLAGS = ("sse4_1", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "amx_tile", "asimd", "sve")


def cpu_signature() -> dict:
    """What the optimised graph depends on: the architecture, the instruction sets that decide
    onnxruntime's kernels and weight layout, and onnxruntime's version."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"machine": platform.machine(), "flags": [f for f in CPU_FLAGS if f in flags],
            "onnxruntime": onnxruntime().__version__}


FLOATS = {"F16": np.float16, "F32": np.float32, "F64": np.float64}  # safetensors dtype -> numpy


def safetensors_layout(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, byte offset in the file, length) of each tensor of a safetensors
    file (an 8-byte little-endian header length, a JSON header, then the raw little-endian data)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > path.stat().st_size:
            raise ValueError(f"header of {n} bytes in a file of {path.stat().st_size}")
        header = json.loads(f.read(n))
    return {k: (v["dtype"], tuple(v["shape"]), 8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items() if k != "__metadata__"}


def safetensors_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (byte offset in the file, length) of each tensor of a safetensors file."""
    return {k: (offset, length) for k, (_, _, offset, length) in safetensors_layout(path).items()}


def task_layout(path: Path, shapes: dict[str, tuple[tuple[int, ...], int]], graph: str) -> dict:
    """A live task file's layout (``safetensors_layout``), each tensor checked against the graph's
    (``shapes``: name -> (dims, ONNX dtype)) and to lie within the file."""
    try:
        layout = safetensors_layout(path)
        size = path.stat().st_size
    except Exception as err:  # noqa: BLE001 - any unreadable file is named
        raise FormError(f"{path}: not a readable live-form task file: {err}") from None
    for k, (dtype, shape, offset, length) in layout.items():
        want = shapes.get(k)
        fits = want is not None and dtype in FLOATS and want[0] == shape and \
            onnx.helper.np_dtype_to_tensor_dtype(np.dtype(FLOATS[dtype])) == want[1]
        if not fits:
            raise FormError(f"{path}: tensor {k!r} {dtype}{list(shape)} does not fit {graph} "
                            f"({'no such tensor' if want is None else list(want[0])})")
        if length != int(np.prod(shape)) * np.dtype(FLOATS[dtype]).itemsize or offset + length > size:
            raise FormError(f"{path}: tensor {k!r} has {length} bytes at {offset}, not its shape's, or past the "
                            f"file's end ({size} bytes)")
    return layout


class LiveSession:
    """The session and the buffers it reads its switched tensors from; ``use(task)`` reads a
    task's tensors from its file into them. Task tensors are not kept in memory (the files are:
    the OS caches them): 4 finetune tasks would hold 54 MB. Every task file's layout is checked
    at load (names, shapes, dtypes against the graph, and that the data is in the file)."""

    def __init__(self, graph: Path, task_files: dict[str, Path], built_on: dict, threads: int,
                 providers: list[str] | None = None):
        if providers and providers[0] != "CPUExecutionProvider":
            raise FormError(f"{graph}: the live form is optimised for a CPU; it cannot run on {providers[0]}")
        here = cpu_signature()
        if built_on and built_on != here:
            raise FormError(f"{graph}: optimised for {built_on}, this machine is {here}; rebuild the live form here "
                            "(taskfold export BUNDLE --out DIR --forms live)")
        proto = onnx.load(str(graph), load_external_data=False)
        shapes = {i.name: (tuple(i.dims), i.data_type) for i in proto.graph.initializer}
        allowed = {p.name for p in task_files.values() if p.parent == graph.parent}
        for init in proto.graph.initializer:
            location = external_info(init).get("location")
            if init.data_location == onnx.TensorProto.EXTERNAL and location not in allowed:
                raise FormError(f"{graph}: tensor {init.name!r} reads {location!r}; a live graph reads only its "
                                "task files beside it")
        del proto
        self.files = dict(task_files)
        self.layouts = {task: task_layout(path, shapes, graph.name) for task, path in task_files.items()}
        names = [set(t) for t in self.layouts.values()]
        if any(n != names[0] for n in names):
            raise FormError(f"{graph}: its task files switch different tensors; every task file must hold the same names")
        first = next(iter(self.layouts))
        self.buffers = {k: np.empty(shape, FLOATS[dtype]) for k, (dtype, shape, _, _) in self.layouts[first].items()}
        self.active: str | None = None
        self.use(first)
        ort = onnxruntime()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # it is optimised already
        opts.add_session_config_entry("session.disable_prepacking", "1")  # kernels read our buffers, not a copy
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self._values = {k: ort.OrtValue.ortvalue_from_numpy(b) for k, b in self.buffers.items()}
        for k, v in self._values.items():
            opts.add_initializer(k, v)
        self.session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def use(self, task: str) -> None:
        if task != self.active:
            self.active = None  # a read that fails half-way leaves mixed buffers: the next use reads all again
            path, layout = self.files[task], self.layouts[task]
            try:
                with open(path, "rb") as f:
                    for k, buf in self.buffers.items():
                        _, _, offset, length = layout[k]
                        f.seek(offset)
                        if f.readinto(buf.reshape(-1).view(np.uint8)) != length:
                            raise FormError(f"{path}: tensor {k!r} ends early; the file changed after the session "
                                            "opened")
                        if sys.byteorder == "big":  # safetensors data is little-endian
                            buf.byteswap(inplace=True)
            except OSError as err:
                raise FormError(f"{path}: cannot read the task's tensors: {err}") from None
            self.active = task

    def runner(self, task: str) -> Callable:
        def run(x):
            self.use(task)
            return self.session.run(None, {self.input: x})

        return run
