"""Loading the shared forms: base weight files read once, shared by every session."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporters.datafiles import external_info, is_base_file


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
