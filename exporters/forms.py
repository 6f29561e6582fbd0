"""Deployment forms built from per-task ONNX graphs: what a device stores and loads for K tasks.

* **shared**: per-task graphs whose weights point into one external-data file of base weights
  (``base.data``, written once) or into a small per-task data file;
* **switch**: one graph whose task-specific tensors are graph *inputs*, plus one onnxruntime
  adapter file per task; ``RunOptions.add_active_adapter`` picks the task inside one session;
* **fp16 / int8** edge variants of a merged model: float16 conversion
  (``onnxruntime.transformers.float16``), static QDQ quantisation calibrated on task images
  (``onnxruntime.quantization``).

Shared tensors are found by content (dtype, shape, bytes), not by name, so a graph of another
structure (a low-rank branch around a base layer) still shares the base's weights. Nothing
here knows a method: it compares graphs.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.config import Int8Recipe
from pipeline.io import atomic_path

BASE_DATA = "base.data"
# further shared bases (a jointly trained backbone is its bundle's base): bases/<id>.data, each
# holding only the tensors no earlier base has; task files never contain a "/"
EXTRA_BASES = "bases"
INLINE_BYTES = 1024  # smaller tensors stay inside the graph (onnx.save's default threshold)
ALIGN = 64  # byte alignment of every tensor in a data file (SIMD loads straight from the buffer)


class FormError(RuntimeError):
    """A form that cannot be built from these graphs; the message says why."""


def _key(arr: np.ndarray) -> str:
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _set_external(init: TensorProto, location: str, offset: int, length: int) -> None:
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


class _DataFile:
    """Tensors appended to one file at aligned offsets, each distinct tensor once."""

    def __init__(self, path: Path):
        self._f = open(path, "wb")
        self.offsets: dict[str, tuple[int, int]] = {}

    def add(self, arr: np.ndarray) -> tuple[int, int]:
        key = _key(arr)
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
    fresh folder and rename that into place when done (``pipeline.io.atomic_dir``): its files
    refer to each other, so the folder is the unit that is complete or absent.

    ``write_graph(name, model)`` stores ``name.onnx``; its initializers found in the base point
    into ``base.data``, the others go to ``name.data``. ``write_switch`` builds the adapter form.
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
        new = [a for a in arrays if self.stored_outside(a) and _key(a) not in self.bases]
        if not new and location != BASE_DATA:
            return 0
        (self.out / location).parent.mkdir(parents=True, exist_ok=True)
        data = _DataFile(self.out / location)
        for arr in new:
            self.bases[_key(arr)] = (location, *data.add(arr))
        self.base_files[location] = data.close()
        return self.base_files[location]

    def stored_outside(self, arr: np.ndarray) -> bool:
        """Weights of ``inline_bytes`` or more go to data files. Integer tensors (shapes, axes)
        stay in the graph, where onnxruntime's shape inference must read them at load."""
        return arr.dtype.kind == "f" and arr.nbytes >= self.inline_bytes

    def write_graph(self, name: str, model: onnx.ModelProto) -> dict:
        """Save ``model`` as ``name.onnx`` (+ ``name.data`` for its own tensors); the model's
        tensors are moved out of the proto. Returns bytes and counts."""
        own = _DataFile(self.out / f"{name}.data")
        shared = own_n = 0
        used = set()
        for init in model.graph.initializer:
            arr = numpy_helper.to_array(init)
            if not self.stored_outside(arr):
                continue
            key = _key(arr)
            if key in self.bases:
                _set_external(init, *self.bases[key])
                used.add(self.bases[key][0])
                shared += 1
            else:
                _set_external(init, f"{name}.data", *own.add(arr))
                own_n += 1
        data_bytes = own.close()
        if not own_n:
            (self.out / f"{name}.data").unlink()
        onnx.save_model(model, str(self.out / f"{name}.onnx"))
        files = [f"{name}.onnx"] + ([f"{name}.data"] if own_n else []) + sorted(used)
        return {"files": files, "graph_bytes": (self.out / f"{name}.onnx").stat().st_size,
                "data_bytes": data_bytes, "shared_tensors": shared, "own_tensors": own_n}

    def write_switch(self, name: str, graphs: dict[str, onnx.ModelProto], defaults: onnx.ModelProto) -> dict:
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
        values = {t: {i.name: numpy_helper.to_array(i) for i in g.graph.initializer} for t, g in graphs.items()}
        varying = [i.name for i in first.graph.initializer if len({_key(values[t][i.name]) for t in tasks}) > 1]
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
        info = self.write_graph(f"{name}.switch", template)
        adapters = {}
        for t in tasks:
            fmt = ort.AdapterFormat()
            fmt.set_adapter_version(1)
            fmt.set_model_version(1)
            fmt.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(values[t][n]))
                                for n in varying})
            rel = f"{name}.{t}.onnx_adapter"
            fmt.export_adapter(str(self.out / rel))
            adapters[t] = {"file": rel, "bytes": (self.out / rel).stat().st_size}
        return {**info, "inputs": varying, "adapters": adapters}


def _structure(model: onnx.ModelProto) -> list[bytes]:
    """The graph without initializer values: nodes, and initializer names."""
    g = model.graph
    return [n.SerializeToString() for n in g.node] + [i.name.encode() for i in g.initializer]


# ------------------------------------------------------------------ loading shared forms


def is_base_file(location: str) -> bool:
    return location == BASE_DATA or location.startswith(f"{EXTRA_BASES}/")


class SharedWeights:
    """The base files (``base.data``, ``bases/*.data``) read once each; every session that points
    into them gets the same OrtValues (``SessionOptions.add_initializer``), so K tasks hold one
    copy of their base in memory. Keep this object alive as long as its sessions: onnxruntime
    does not copy the values."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._bufs: dict[str, np.ndarray] = {}
        self._values: dict[tuple, object] = {}

    def _buf(self, location: str) -> np.ndarray:
        if location not in self._bufs:
            self._bufs[location] = np.fromfile(self.folder / location, dtype=np.uint8)
        return self._bufs[location]

    def initializers(self, graph: Path) -> "_Initializers":
        import onnxruntime as ort

        model = onnx.load(str(graph), load_external_data=False)
        inputs = {i.name for i in model.graph.input}
        out = _Initializers(owner=self)
        for init in model.graph.initializer:
            ext = external_info(init)
            # an initializer that is also an input is an adapter's default: onnxruntime must own it
            # (a user-added one is not overridable, and the adapter's value would be ignored)
            location = ext.get("location", "")
            if init.data_location != TensorProto.EXTERNAL or not is_base_file(location) or init.name in inputs:
                continue
            off, length = int(ext["offset"]), int(ext["length"])
            dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
            key = (location, off, length, dtype.str, tuple(init.dims))
            if key not in self._values:
                arr = self._buf(location)[off : off + length].view(dtype).reshape(tuple(init.dims))
                self._values[key] = ort.OrtValue.ortvalue_from_numpy(arr)
            out[init.name] = self._values[key]
        return out


class _Initializers(dict):
    """name -> OrtValue, keeping alive the ``SharedWeights`` whose buffer the values point into."""

    def __init__(self, owner: SharedWeights):
        super().__init__()
        self.owner = owner


# ------------------------------------------------------------------ edge variants


def to_fp16(src: Path, dst: Path) -> Path:
    """Float16 weights and compute; inputs and outputs stay float32 so callers do not change."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    with atomic_path(Path(dst)) as tmp:
        onnx.save_model(model, str(tmp))
    return Path(dst)


def to_int8(src: Path, dst: Path, calibration: np.ndarray, input_name: str = "images",
            recipe: Int8Recipe = Int8Recipe()) -> Path:
    """Static INT8 in QDQ form, calibrated (min-max) on ``calibration`` (normalised task images,
    N x C x H x W). Measured on the quickstart's 32 models (``benchmarks/int8_recipes.py``, the
    README's table), the default recipe is:

    * the graph is pre-processed first (shape inference, BatchNorm folded into the convs), so
      weights are quantised after folding; an unfolded BatchNorm is refused;
    * uint8 activations, per-channel int8 weights on 7 bits (``reduce_range``): x86 CPUs without
      VNNI multiply uint8 x int8 pairs with VPMADDUBSW, whose int16 sums saturate at 8-bit
      weights (mean accuracy change -0.121 against -0.023 on 7 bits); uint8 weights do not
      saturate but ran 3.6-4.9x slower than FP32 here;
    * the input layer (the first conv) stays float: a task's re-estimated BatchNorm can scale a
      stem channel up by orders of magnitude, and the input's quantisation noise with it
      (norm_head lost up to 26 points more with it quantised). It cost no measurable time.
    """
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{input_name: calibration[i : i + 16]} for i in range(0, len(calibration), 16)])

        def get_next(self):
            return next(self.batches, None)

    dst = Path(dst)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the quantiser logs a warning per BatchNorm-like tensor
    try:
        with atomic_path(dst) as tmp, tempfile.TemporaryDirectory() as work:
            pre, out = Path(work) / "pre.onnx", Path(work) / "int8.onnx"
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            nodes = onnx.load(str(pre)).graph.node
            if any(n.op_type == "BatchNormalization" for n in nodes):
                raise FormError(f"{src}: BatchNormalization left after pre-processing; its convs would be "
                                "quantised before folding (is the graph constant-folded?)")
            first_conv = [n.name for n in nodes if n.op_type == "Conv"][:1] if recipe.float_first_conv else []
            types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=recipe.reduce_range, activation_type=types[recipe.activations],
                            weight_type=types[recipe.weights], nodes_to_exclude=first_conv)
            os.replace(out, tmp)
    finally:
        logging.disable(previous)
    return dst
