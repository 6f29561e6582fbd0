"""INT8 weight parameters: ``conv_weight_params`` computes in numpy what onnxruntime's quantiser
computes per channel in Python, and handing them over changes no byte of the INT8 model."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.quant_utils import compute_data_quant_params

from exporters.datafiles import FormError
from exporters.precision import conv_weight_params


def _graph() -> onnx.ModelProto:
    """stem conv (excluded) -> conv with an all-zero and a tiny output channel -> depthwise conv."""
    rng = np.random.default_rng(0)
    stem = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    conv = rng.standard_normal((6, 4, 1, 1)).astype(np.float32) * np.float32(0.3)
    conv[2] = 0
    conv[4] = np.float32(1e-40)  # subnormal: below float32's smallest normal, a scale of 1 as onnxruntime sets it
    conv[5] = -np.abs(conv[5])  # negative only: the symmetric range comes from the minimum
    dw = rng.standard_normal((6, 1, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((stem, "stem.w"), (conv, "conv.w"), (dw, "dw.w"))]
    nodes = [helper.make_node("Conv", ["x", "stem.w"], ["a"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Conv", ["b", "conv.w"], ["c"], name="conv"),
             helper.make_node("Conv", ["c", "dw.w"], ["y"], name="dw", group=6, pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


CASES = [(t, rr, full) for t in (QuantType.QInt8, QuantType.QUInt8) for rr in (True, False) for full in (True, False)]


@pytest.mark.parametrize("qtype,reduce_range,full", CASES)
def test_params_are_onnxruntimes_own_per_channel(qtype, reduce_range, full):
    model = _graph()
    got = conv_weight_params(model.graph, {"stem"}, qtype.tensor_type, reduce_range, full)
    assert set(got) == {"conv.w", "dw.w"}  # the excluded conv keeps float weights
    for name, depthwise in (("conv.w", False), ("dw.w", True)):
        w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))
        rr = reduce_range and not (depthwise and full)
        assert len(got[name]) == len(w)
        for channel, p in zip(w, got[name]):
            zero, scale = compute_data_quant_params(channel.ravel(), qtype.tensor_type, True, reduce_range=rr)
            assert p["axis"] == 0
            assert np.float32(p["scale"]) == scale.astype(np.float32), (name, p, scale)
            assert p["zero_point"] == int(zero), (name, p, zero)


class _Reader(CalibrationDataReader):
    def __init__(self):
        x = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)
        self.batches = iter([{"x": x[:4]}, {"x": x[4:]}])

    def get_next(self):
        return next(self.batches, None)


@pytest.mark.parametrize("qtype", [QuantType.QInt8, QuantType.QUInt8])
def test_handing_them_over_changes_no_byte(tmp_path, qtype):
    src = tmp_path / "m.onnx"
    onnx.save_model(_graph(), str(src))
    files = {}
    for given in (False, True):
        overrides = {"dw.w": [{"axis": 0, "reduce_range": False}]}  # what onnxruntime is told without them
        if given:
            overrides = conv_weight_params(onnx.load(str(src)).graph, {"stem"}, qtype.tensor_type, True, True)
        files[given] = tmp_path / f"q{given}.onnx"
        quantize_static(str(src), str(files[given]), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=qtype, nodes_to_exclude=["stem"],
                        extra_options={"TensorQuantOverrides": overrides})
    assert files[True].read_bytes() == files[False].read_bytes()


def test_a_non_finite_weight_is_named():
    model = _graph()
    w = next(i for i in model.graph.initializer if i.name == "conv.w")
    bad = numpy_helper.to_array(w).copy()
    bad[3, 1, 0, 0] = np.nan
    w.CopyFrom(numpy_helper.from_array(bad, "conv.w"))
    with pytest.raises(FormError, match=r"conv weight 'conv.w' has non-finite values in output channel\(s\) \[3\]"):
        conv_weight_params(model.graph, {"stem"}, QuantType.QInt8.tensor_type, True, True)
