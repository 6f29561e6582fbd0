"""Edge variants of a merged model: float16 weights and compute, and static INT8 (QDQ)
calibrated on task images, with the recipe measured to keep accuracy on x86 CPUs."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict, Field

from exporters.datafiles import FormError
from pipeline.core.io import atomic_path, temp_dir


class Int8Recipe(BaseModel):
    """How the INT8 edge variant quantises (``to_int8``). The defaults are the measured best on
    x86 CPUs without VNNI (``benchmarks/int8_recipes.py``)."""

    model_config = ConfigDict(extra="forbid")

    weights: Literal["int8", "uint8"] = "int8"  # per-channel weight type
    activations: Literal["uint8", "int8"] = "uint8"
    reduce_range: bool = Field(True, description="7-bit weights: no VPMADDUBSW saturation on x86 without VNNI")
    depthwise_full_range: bool = Field(
        True, description="with reduce_range, depthwise convs keep 8-bit weights: onnxruntime's x86 depthwise kernel "
                          "widens to 16 bits and sums pairs into int32 (VPMADDWD), so nothing saturates")
    float_first_conv: bool = Field(True, description="leave the input layer unquantised")
    float_last: int = Field(0, ge=0, description="leave the last N quantisable layers (convs, the head) float")
    calibration: Literal["minmax", "percentile"] = Field(
        "minmax", description="how activation ranges are set from the calibration images")
    bias_correction: bool = Field(True, description="remove from each layer's bias the mean output shift its "
                                                    "weight rounding causes (measured inputs)")
    percentile: float = Field(99.999, gt=90, le=100, description="calibration: percentile keeps this share of values")

    def describe(self) -> str:
        bits = ("7-bit (depthwise 8-bit) " if self.depthwise_full_range else "7-bit ") if self.reduce_range else ""
        calib = f"{self.percentile:g}th percentile" if self.calibration == "percentile" else self.calibration
        return (f"{bits}{self.weights} weights / {self.activations} activations, "
                f"first conv {'float' if self.float_first_conv else 'quantised'}"
                + (f", last {self.float_last} layers float" if self.float_last else "") + f", {calib} calibration"
                + (", bias correction" if self.bias_correction else ""))


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
      saturate but ran 3.6-4.9x slower than FP32 here. Depthwise convs keep 8 bits
      (``depthwise_full_range``): their kernel widens to 16 bits first, and nothing saturates;
    * bias correction (``correct_biases``): the mean output shift that rounding a layer's weights
      causes, measured on the calibration images, is taken out of its bias;
    * the input layer (the first conv) stays float: a task's re-estimated BatchNorm can scale a
      stem channel up by orders of magnitude, and the input's quantisation noise with it
      (norm_head lost up to 26 points more with it quantised). It cost no measurable time.
    """
    import logging

    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
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
        with atomic_path(dst) as tmp, temp_dir(dst) as work:
            pre, out = Path(work) / "pre.onnx", Path(work) / "int8.onnx"
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            graph = onnx.load(str(pre)).graph
            nodes = graph.node
            if any(n.op_type == "BatchNormalization" for n in nodes):
                raise FormError(f"{src}: BatchNormalization left after pre-processing; its convs would be "
                                "quantised before folding (is the graph constant-folded?)")
            layers = [n.name for n in nodes if n.op_type in ("Conv", "Gemm", "MatMul")]
            excluded = layers[:1] if recipe.float_first_conv else []
            excluded += layers[len(layers) - recipe.float_last:] if recipe.float_last else []
            types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
            methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
            overrides = conv_weight_params(graph, set(excluded), types[recipe.weights].tensor_type,
                                           recipe.reduce_range, recipe.depthwise_full_range)
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=recipe.reduce_range, activation_type=types[recipe.activations],
                            weight_type=types[recipe.weights], nodes_to_exclude=excluded,
                            calibrate_method=methods[recipe.calibration],
                            extra_options={"CalibPercentile": recipe.percentile, "TensorQuantOverrides": overrides})
            if recipe.bias_correction:
                onnx.save_model(correct_biases(onnx.load(str(pre)), onnx.load(str(out)), calibration, input_name),
                                str(out))
            os.replace(out, tmp)
    finally:
        logging.disable(previous)
    return dst


def conv_weight_params(graph: onnx.GraphProto, excluded: set[str], weight_type: int, reduce_range: bool,
                       depthwise_full_range: bool) -> dict[str, list[dict]]:
    """Per-channel scale and zero point of every float conv weight ``to_int8`` quantises, as
    onnxruntime's ``TensorQuantOverrides``: the values its quantiser would compute (symmetric,
    ``compute_scale_zp``), in one numpy pass per weight instead of its Python loop over the
    ~21,000 channels of an EfficientNet-Lite0 (0.7 of its 2 s per model here; the INT8 files
    are byte for byte the same, ``tests/test_int8_params.py``)."""
    from onnx import numpy_helper
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    inits = {i.name: i for i in graph.initializer}
    grouped: dict[str, bool] = {}  # weight -> read by a grouped conv (full range with depthwise_full_range)
    for node in graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.name not in excluded and node.input[1] in inits:
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            grouped[node.input[1]] = grouped.get(node.input[1], False) or group > 1
    params: dict[str, list[dict]] = {}
    for name, depthwise in grouped.items():
        w = numpy_helper.to_array(inits[name])
        if w.dtype != np.float32 or w.ndim < 2 or not w.size:
            continue
        qmin, qmax = get_qmin_qmax_for_qType(weight_type, reduce_range and not (depthwise and depthwise_full_range),
                                             symmetric=True)
        flat = w.reshape(len(w), -1)
        absmax = np.maximum(np.abs(np.minimum(flat.min(axis=1), 0)), np.abs(np.maximum(flat.max(axis=1), 0)))
        if not np.isfinite(absmax).all():
            raise FormError(f"conv weight {name!r} has non-finite values in output channel(s) "
                            f"{np.flatnonzero(~np.isfinite(absmax))[:8].tolist()}; it cannot be quantised")
        scale = 2 * absmax.astype(np.float64) / (np.float64(qmax) - np.float64(qmin))
        zero = int(np.round((qmin + qmax) / np.float64(2.0)))
        # a channel whose scale would be under float32's smallest normal gets 1 and zero point 0, as onnxruntime sets it
        params[name] = [{"axis": 0, "scale": float(np.float32(s)), "zero_point": zero} if s >= np.finfo(np.float32).tiny
                        else {"axis": 0, "scale": 1.0, "zero_point": 0} for s in scale]
    return params


def correct_biases(float_model: onnx.ModelProto, qdq: onnx.ModelProto, images: np.ndarray,
                   input_name: str = "images") -> onnx.ModelProto:
    """``qdq`` with each quantised layer's int32 bias moved by the mean output shift that rounding
    its weights causes: ``E[(W_q - W) x] = (W_q - W) E[x]``, with ``E[x]`` per input channel
    measured on ``images`` in ``float_model`` (the pre-processed float graph ``qdq`` was made
    from; layers are matched by node name). Bias correction as in Nagel et al., "Data-Free
    Quantization" (2019). Measured on the quickstart's models, it took INT8's agreement with FP32
    from 0.87 to 0.95 (finetune/fmnist), because these small, briefly trained models have low
    margins and per-channel weight rounding shifted every channel's mean a little."""
    import onnxruntime as ort
    from onnx import numpy_helper

    producer = {o: n for n in qdq.graph.node for o in n.output}
    inits = {i.name: i for i in qdq.graph.initializer}

    def dq_init(name: str, dtype) -> tuple | None:
        """(initializer, scale, axis) of a DequantizeLinear of a ``dtype`` constant feeding ``name``."""
        node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            return None
        init = inits[node.input[0]]
        if init.data_type != dtype:
            return None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        return init, numpy_helper.to_array(inits[node.input[1]]).astype(np.float64), axis

    layers = {}
    for node in qdq.graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2:
            weight, bias = dq_init(node.input[1], onnx.TensorProto.INT8), dq_init(node.input[2], onnx.TensorProto.INT32)
            if weight is not None and bias is not None:
                layers[node.name] = (node, weight, bias)
    floats = {n.name: n for n in float_model.graph.node if n.name in layers}
    if not floats:
        return qdq
    probe = onnx.ModelProto()
    probe.CopyFrom(float_model)
    outputs = {o.name for o in probe.graph.output}
    wanted = sorted({n.input[0] for n in floats.values()} - outputs - {input_name})
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in wanted)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for i in range(0, len(images), 16):
        batch = np.ascontiguousarray(images[i : i + 16], dtype=np.float32)
        acts = dict(zip(names, sess.run(None, {input_name: batch})), **{input_name: batch})
        for t in {n.input[0] for n in floats.values()}:
            a = acts[t].astype(np.float64)  # (N, C, ...): a mean per channel
            sums[t] = sums.get(t, 0) + a.sum(axis=(0, *range(2, a.ndim)))
            counts[t] = counts.get(t, 0) + a.size // a.shape[1]
    float_inits = {i.name: i for i in float_model.graph.initializer}
    for name, fnode in floats.items():
        node, (w_init, w_scale, axis), (b_init, b_scale, _) = layers[name]
        w = numpy_helper.to_array(float_inits[fnode.input[1]]).astype(np.float64)
        shape = [1] * w.ndim
        shape[axis] = -1
        error = numpy_helper.to_array(w_init).astype(np.float64) * w_scale.reshape(shape) - w
        mean = sums[fnode.input[0]] / counts[fnode.input[0]]
        if node.op_type == "Conv":
            per_pair = error.sum(axis=(2, 3)) if error.ndim == 4 else error.sum(axis=tuple(range(2, error.ndim)))
            groups = next((a.i for a in node.attribute if a.name == "group"), 1)
            # grouped: output channel o reads input channels of its group
            cin = per_pair.shape[1]
            index = (np.arange(per_pair.shape[0]) // (per_pair.shape[0] // groups))[:, None] * cin + np.arange(cin)
            shift = (per_pair * mean[index]).sum(axis=1)
        else:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            shift = error @ mean if trans_b else mean @ error
        q = numpy_helper.to_array(b_init).astype(np.float64) - shift / np.broadcast_to(b_scale, shift.shape)
        info = np.iinfo(np.int32)
        b_init.CopyFrom(numpy_helper.from_array(np.clip(np.round(q), info.min, info.max).astype(np.int32), b_init.name))
    return qdq
