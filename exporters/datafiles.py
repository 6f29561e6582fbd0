"""Shared weight files for the deployment forms: per-task graphs whose initializers point into
one external-data file of base weights (``base.data``, written once) or into a small per-task
data file.

Shared tensors are found by content (dtype, shape, bytes), not by name, so a graph of another
structure (a low-rank branch around a base layer) still shares the base's weights. Nothing here
knows a method: it compares graphs.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

SHARED = "shared"  # the folder, under exports/, of every form that shares base weights
BASE_DATA = "base.data"
# further shared bases (a jointly trained backbone is its bundle's base): bases/<id>.data, each
# holding only the tensors no earlier base has; task files never contain a "/"
EXTRA_BASES = "bases"
INLINE_BYTES = 1024  # smaller tensors stay inside the graph (onnx.save's default threshold)
ALIGN = 64  # byte alignment of every tensor in a data file (SIMD loads straight from the buffer)


class FormError(RuntimeError):
    """A form that cannot be built from these graphs; the message says why."""


def tensor_key(arr: np.ndarray) -> str:
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """A graph's initializers by name, as arrays (what the forms compare between tasks)."""
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def stored_outside(arr: np.ndarray, inline_bytes: int = INLINE_BYTES) -> bool:
    """Weights of ``inline_bytes`` or more go to data files. Integer tensors (shapes, axes)
    stay in the graph, where onnxruntime's shape inference must read them at load."""
    return arr.dtype.kind == "f" and arr.nbytes >= inline_bytes


def move_out(model: onnx.ModelProto, path: Path, skip: set[str]) -> bool:
    """The graph's embedded weights (``stored_outside``), but those named in ``skip``, moved to
    the data file ``path`` (referred to by its name: it lies beside the graph). False, and no
    file, when there are none."""
    data = DataFile(path)
    moved = 0
    for init in model.graph.initializer:
        if init.name in skip or init.data_location == TensorProto.EXTERNAL:
            continue
        arr = numpy_helper.to_array(init)
        if stored_outside(arr):
            set_external(init, path.name, *data.add(arr))
            moved += 1
    data.close()
    if not moved:
        path.unlink()
    return bool(moved)


def set_external(init: TensorProto, location: str, offset: int, length: int) -> None:
    init.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        init.ClearField(field)
    del init.external_data[:]
    init.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = init.external_data.add()
        entry.key, entry.value = k, v


def external_info(init: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in init.external_data}


class DataFile:
    """Tensors appended to one file at aligned offsets, each distinct tensor once."""

    def __init__(self, path: Path):
        self._f = open(path, "wb")
        self.offsets: dict[str, tuple[int, int]] = {}

    def add(self, arr: np.ndarray) -> tuple[int, int]:
        key = tensor_key(arr)
        if key not in self.offsets:
            pad = (-self._f.tell()) % ALIGN
            self._f.write(b"\0" * pad)
            raw = np.ascontiguousarray(arr).tobytes()
            self.offsets[key] = (self._f.tell(), len(raw))
            self._f.write(raw)
        return self.offsets[key]

    def close(self) -> int:
        size = self._f.tell()
        self._f.close()
        return size


class SharedWriter:
    """Writes graphs into one folder whose ``base.data`` holds the base weights once. Give it a
    fresh folder and rename that into place when done (``pipeline.core.io.atomic_dir``): its
    files refer to each other, so the folder is the unit that is complete or absent.

    ``write_graph(name, model)`` stores ``name.onnx``; its initializers found in the base point
    into ``base.data``, the others go to ``name.data``.
    """

    def __init__(self, out_dir: Path, base: onnx.ModelProto, inline_bytes: int = INLINE_BYTES):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.inline_bytes = inline_bytes
        self.bases: dict[str, tuple[str, int, int]] = {}  # tensor key -> (base file, offset, length)
        self.base_files: dict[str, int] = {}  # base file written -> bytes
        self.base_bytes = self.add_base(BASE_DATA, base)

    def add_base(self, location: str, model: onnx.ModelProto) -> int:
        """Register another shared base: its tensors that no registered base holds go to
        ``location`` (relative to the folder), written once. Returns the bytes written; no file
        is written when every tensor is already shared."""
        arrays = [numpy_helper.to_array(init) for init in model.graph.initializer]
        new = [a for a in arrays if self.stored_outside(a) and tensor_key(a) not in self.bases]
        if not new and location != BASE_DATA:
            return 0
        (self.out / location).parent.mkdir(parents=True, exist_ok=True)
        data = DataFile(self.out / location)
        for arr in new:
            self.bases[tensor_key(arr)] = (location, *data.add(arr))
        self.base_files[location] = data.close()
        return self.base_files[location]

    def stored_outside(self, arr: np.ndarray) -> bool:
        return stored_outside(arr, self.inline_bytes)

    def write_pool(self, location: str, arrays: list[np.ndarray]) -> dict[str, tuple[str, int, int]]:
        """Write tensors that several graphs of one form read (a method's stored rows) to
        ``location``, each once; pass the result to ``write_graph(pool=...)``. Unlike a base
        file, sessions do not share these in memory: each reads what it needs."""
        data = DataFile(self.out / location)
        placed = {tensor_key(a): (location, *data.add(a)) for a in arrays if self.stored_outside(a)}
        data.close()
        return placed

    def write_graph(self, name: str, model: onnx.ModelProto,
                    pool: dict[str, tuple[str, int, int]] | None = None) -> dict:
        """Save ``model`` as ``name.onnx`` (+ ``name.data`` for its own tensors); the model's
        tensors are moved out of the proto. Tensors found in the base files or in ``pool``
        (``write_pool``) point there. Returns bytes and counts."""
        own = DataFile(self.out / f"{name}.data")
        shared = own_n = 0
        used = set()
        pool = pool or {}
        for init in model.graph.initializer:
            arr = numpy_helper.to_array(init)
            if not self.stored_outside(arr):
                continue
            key = tensor_key(arr)
            if key in self.bases or key in pool:
                place = self.bases.get(key) or pool[key]
                set_external(init, *place)
                used.add(place[0])
                shared += 1
                continue
            set_external(init, f"{name}.data", *own.add(arr))
            own_n += 1
        data_bytes = own.close()
        if not own_n:
            (self.out / f"{name}.data").unlink()
        onnx.save_model(model, str(self.out / f"{name}.onnx"))
        files = [f"{name}.onnx"] + ([f"{name}.data"] if own_n else []) + sorted(used)
        return {"files": files, "graph_bytes": (self.out / f"{name}.onnx").stat().st_size,
                "data_bytes": data_bytes, "shared_tensors": shared, "own_tensors": own_n}


def is_base_file(location: str) -> bool:
    return location == BASE_DATA or location.startswith(f"{EXTRA_BASES}/")
