"""The live graph's files, read and checked before any session opens (``LiveFiles``): the
graph was optimised on a CPU like this one (``cpu_signature``), reads external data only from its
task files and its data file, and every task file holds the same tensors, each of the graph's
shape and dtype (or per-channel scales of one) and within its file. ``exporters.live_session``
runs them; ``exporters.forms.live`` writes them."""
from __future__ import annotations

import json
import platform
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from exporters import channel_scales
from exporters.channel_scales import SUFFIX
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
    (``shapes``: name -> (dims, ONNX dtype)) and to lie within the file. A tensor named
    ``name + channel_scales.SUFFIX`` holds the per-output-channel scales of the graph's ``name``."""
    try:
        layout = safetensors_layout(path)
        size = path.stat().st_size
    except Exception as err:  # noqa: BLE001 - any unreadable file is named
        raise FormError(f"{path}: not a readable live-form task file: {err}") from None
    for k, (dtype, shape, offset, length) in layout.items():
        target = k.removesuffix(SUFFIX)
        want = shapes.get(target)
        if want is None or dtype not in FLOATS or onnx.helper.np_dtype_to_tensor_dtype(np.dtype(FLOATS[dtype])) != want[1]:
            fits = False
        elif k != target:
            fits = channel_scales.blocked(want[0], shape) is not None
        else:
            fits = want[0] == shape
        if not fits:
            raise FormError(f"{path}: tensor {k!r} {dtype}{list(shape)} does not fit {graph} "
                            f"({'no such tensor' if want is None else list(want[0])})")
        if length != int(np.prod(shape)) * np.dtype(FLOATS[dtype]).itemsize or offset + length > size:
            raise FormError(f"{path}: tensor {k!r} has {length} bytes at {offset}, not its shape's, or past the "
                            f"file's end ({size} bytes)")
    return layout


def _read_into(f, offset: int, length: int, out: np.ndarray, what: str) -> None:
    """``length`` little-endian bytes at ``offset`` of the open file ``f`` into ``out``, in place."""
    f.seek(offset)
    if f.readinto(out.reshape(-1).view(np.uint8)) != length:
        raise FormError(f"{what} ends early; the file changed after the session opened")
    if sys.byteorder == "big":  # safetensors and ONNX external data are little-endian
        out.byteswap(inplace=True)


def external_places(graph: Path, data: Path, inits: list) -> dict[str, tuple[int, int, np.dtype]]:
    """Where the live graph's external tensors ``inits`` lie in its data file ``data``: name ->
    (byte offset, length, little-endian dtype), each checked to read that file, to lie within it
    and to have its shape's length."""
    try:
        size = data.stat().st_size if inits else 0
    except OSError as err:
        raise FormError(f"{data}: cannot read the live graph's tensors: {err}") from None
    places = {}
    for init in inits:
        info = external_info(init)
        if info.get("location") != data.name:  # switched tensors were taken out: only this file is left
            raise FormError(f"{graph}: tensor {init.name!r} reads {info.get('location')!r}, "
                            f"not {data.name}; no task switches it whole")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).newbyteorder("<")
        offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        if length != int(np.prod(init.dims)) * dtype.itemsize or offset + length > size:
            raise FormError(f"{data}: tensor {init.name!r} has {length} bytes at {offset}, not its "
                            f"shape's, or past the file's end ({size} bytes)")
        places[init.name] = (offset, length, dtype)
    return places


def graph_tensors(graph: Path, data: Path, inits: list) -> dict[str, np.ndarray]:
    """The values of the live graph's tensors ``inits``: embedded, or read from its data file
    ``data`` (``external_places``)."""
    out = {init.name: numpy_helper.to_array(init) for init in inits if init.data_location != onnx.TensorProto.EXTERNAL}
    external = [i for i in inits if i.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return out
    places = external_places(graph, data, external)
    try:
        with open(data, "rb") as f:
            for init in external:
                offset, length, dtype = places[init.name]
                out[init.name] = np.empty(tuple(init.dims), dtype.newbyteorder("="))
                _read_into(f, offset, length, out[init.name], f"{data}: tensor {init.name!r}")
    except OSError as err:
        raise FormError(f"{data}: cannot read the live graph's tensors: {err}") from None
    return out


class LiveFiles:
    """A live graph and its task files, checked before any session opens: the graph was optimised
    on a CPU like this one, reads external data only from its task files and its data file, and
    every task file holds the same tensors, each of the graph's shape and dtype (or per-channel
    scales of one) and within the file. ``names`` are the graph tensors a task switch sets; those
    a task file holds as scales are rebuilt from their base in the graph, read from its data file
    at each switch (the OS caches it) rather than held: holding them kept the base convs twice
    (norm_head live: 30 MB against 17)."""

    def __init__(self, graph: Path, task_files: dict[str, Path], built_on: dict, providers: list[str] | None = None):
        if providers and providers[0] != "CPUExecutionProvider":
            raise FormError(f"{graph}: the live graph is optimised for a CPU; it cannot run on {providers[0]}")
        here = cpu_signature()
        if built_on and built_on != here:
            raise FormError(f"{graph}: optimised for {built_on}, this machine is {here}; rebuild the live form here "
                            "(taskfold export BUNDLE --out DIR --forms live)")
        proto = onnx.load(str(graph), load_external_data=False)
        shapes = {i.name: (tuple(i.dims), i.data_type) for i in proto.graph.initializer}
        self.data = graph.with_suffix(".data")  # the tensors no task switches whole
        allowed = {p.name for p in task_files.values() if p.parent == graph.parent} | {self.data.name}
        for init in proto.graph.initializer:
            location = external_info(init).get("location")
            if init.data_location == onnx.TensorProto.EXTERNAL and location not in allowed:
                raise FormError(f"{graph}: tensor {init.name!r} reads {location!r}; a live graph reads only its "
                                "task files and its data file beside it")
        self.graph = graph
        self.files = dict(task_files)
        self.layouts = {task: task_layout(path, shapes, graph.name) for task, path in task_files.items()}
        stored = [set(t) for t in self.layouts.values()]
        if any(n != stored[0] for n in stored):
            raise FormError(f"{graph}: its task files switch different tensors; every task file must hold the same names")
        self.first = next(iter(self.layouts))
        first = self.layouts[self.first]
        self.names = {k.removesuffix(SUFFIX) for k in first}
        scaled = {k.removesuffix(SUFFIX) for k in first if k.endswith(SUFFIX)}
        bases = [i for i in proto.graph.initializer if i.name in scaled]
        self.embedded_bases = graph_tensors(graph, self.data, [i for i in bases if i.data_location != onnx.TensorProto.EXTERNAL])
        self.base_places = external_places(graph, self.data, [i for i in bases if i.data_location == onnx.TensorProto.EXTERNAL])
        self.shapes = {k: shapes[k][0] for k in self.names}

    def read(self, task: str, into: dict[str, np.ndarray]) -> None:
        """The task's tensors from its file into ``into`` (graph name -> array of the tensor's
        shape); a tensor its file holds as scales is its base, read into place, times them."""
        path, layout = self.files[task], self.layouts[task]
        try:
            with open(path, "rb") as f, (open(self.data, "rb") if self.base_places else nullcontext()) as data:
                for k, (dtype, shape, offset, length) in layout.items():
                    target = k.removesuffix(SUFFIX)
                    buf = into[target] if k == target else np.empty(shape, FLOATS[dtype])
                    _read_into(f, offset, length, buf, f"{path}: tensor {k!r}")
                    if k == target:
                        continue
                    if target in self.embedded_bases:
                        into[target][...] = self.embedded_bases[target]
                    else:
                        base_offset, base_length, _ = self.base_places[target]
                        _read_into(data, base_offset, base_length, into[target], f"{self.data}: tensor {target!r}")
                    channel_scales.apply(into[target], buf, into[target])
        except OSError as err:
            raise FormError(f"{err.filename or path}: cannot read the task's tensors: {err}") from None

    def empty(self) -> dict[str, np.ndarray]:
        """Arrays for one task's switched tensors, by graph name (uninitialised)."""
        dtypes = {k.removesuffix(SUFFIX): FLOATS[d] for k, (d, _, _, _) in self.layouts[self.first].items()}
        return {k: np.empty(self.shapes[k], dtypes[k]) for k in self.names}
