"""fp16, int8: edge variants of the merged model, ``<label>/<task>.fp16.onnx`` (float16 weights
and compute) and ``.int8.onnx`` (static INT8, QDQ, calibrated on the task's train images);
checked for accuracy against FP32."""
from __future__ import annotations

from pydantic import BaseModel

from exporters.forms.base import BuildContext, Form, sessions_spec
from exporters.precision import Int8Recipe, to_fp16, to_int8


class Fp16(Form):
    name = "fp16"
    note = "merged, float16 weights and compute"
    lossy = True

    def build(self, ctx: BuildContext, label: str, bundle) -> dict:
        files = {}
        for t in bundle.tasks:
            files[t] = f"{label}/{t}.fp16.onnx"
            to_fp16(ctx.exports / label / f"{t}.onnx", ctx.exports / files[t])
        return sessions_spec(files, shared=False)


class Int8(Form):
    name = "int8"
    note = "merged, static INT8 (QDQ), calibrated on task images"
    Options: type[BaseModel] = Int8Recipe
    lossy = True

    def build(self, ctx: BuildContext, label: str, bundle) -> dict:
        files = {}
        for t in bundle.tasks:
            files[t] = f"{label}/{t}.int8.onnx"
            to_int8(ctx.exports / label / f"{t}.onnx", ctx.exports / files[t], ctx.images[t].calibration,
                    recipe=self.options)
        return sessions_spec(files, shared=False)
