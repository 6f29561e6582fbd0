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
    float_first_conv: bool = Field(True, description="leave the input layer unquantised")
    float_last: int = Field(0, ge=0, description="leave the last N quantisable layers (convs, the head) float")
    calibration: Literal["minmax", "percentile"] = Field(
        "minmax", description="how activation ranges are set from the calibration images")
    percentile: float = Field(99.999, gt=90, le=100, description="calibration: percentile keeps this share of values")

    def describe(self) -> str:
        bits = "7-bit " if self.reduce_range else ""
        calib = f"{self.percentile:g}th percentile" if self.calibration == "percentile" else self.calibration
        return (f"{bits}{self.weights} weights / {self.activations} activations, "
                f"first conv {'float' if self.float_first_conv else 'quantised'}"
                + (f", last {self.float_last} layers float" if self.float_last else "") + f", {calib} calibration")


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
            nodes = onnx.load(str(pre)).graph.node
            if any(n.op_type == "BatchNormalization" for n in nodes):
                raise FormError(f"{src}: BatchNormalization left after pre-processing; its convs would be "
                                "quantised before folding (is the graph constant-folded?)")
            layers = [n.name for n in nodes if n.op_type in ("Conv", "Gemm", "MatMul")]
            excluded = layers[:1] if recipe.float_first_conv else []
            excluded += layers[len(layers) - recipe.float_last:] if recipe.float_last else []
            types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
            methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=recipe.reduce_range, activation_type=types[recipe.activations],
                            weight_type=types[recipe.weights], nodes_to_exclude=excluded,
                            calibrate_method=methods[recipe.calibration],
                            extra_options={"CalibPercentile": recipe.percentile})
            os.replace(out, tmp)
    finally:
        logging.disable(previous)
    return dst
