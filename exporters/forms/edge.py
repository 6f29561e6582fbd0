"""fp16, int8: edge variants of the merged model, ``<label>/<task>.fp16.onnx`` (float16 weights
and compute) and ``.int8.onnx`` (static INT8, QDQ, calibrated on the task's train images);
checked for accuracy against FP32."""
from __future__ import annotations

from pydantic import BaseModel

from exporters.forms.base import BuildContext, Form, sessions_spec
from exporters.precision import Int8Recipe, to_fp16, to_int8


def keep_metadata(src, dst) -> None:
    """The merged file's metadata (task, class names) onto a variant made from it."""
    import onnx

    from pipeline.core.io import atomic_path

    props = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    model = onnx.load(str(dst))
    if props and {p.key: p.value for p in model.metadata_props} != props:
        onnx.helper.set_model_props(model, props)
        with atomic_path(dst) as tmp:
            onnx.save_model(model, str(tmp))


def fp16_variant(src, dst) -> None:
    to_fp16(src, dst)
    keep_metadata(src, dst)


def int8_variant(src, dst, calibration, recipe: Int8Recipe) -> None:
    to_int8(src, dst, calibration, recipe=recipe)
    keep_metadata(src, dst)


class MergedVariant(Form):
    """A file per task, ``<label>/<task>.<name>.onnx``, made from the task's merged model by the
    module-level function ``make(src, dst, *extra)`` in the build's worker processes, while the
    build goes on with other forms (``BuildContext.submit``)."""
    lossy = True
    make: staticmethod

    def extra(self, ctx: BuildContext, tasks: list[str]) -> list[list]:
        """Further argument lists for ``make``, one value per task."""
        return []

    def build(self, ctx: BuildContext, label: str, bundle) -> dict:
        files = {t: f"{label}/{t}.{self.name}.onnx" for t in bundle.tasks}
        ctx.submit((label, self.name), self.make, [ctx.exports / label / f"{t}.onnx" for t in files],
                [ctx.exports / f for f in files.values()], *self.extra(ctx, list(files)))
        return sessions_spec(files, shared=False)


class Fp16(MergedVariant):
    name = "fp16"
    note = "merged, float16 weights and compute"
    make = staticmethod(fp16_variant)


class Int8(MergedVariant):
    name = "int8"
    note = "merged, static INT8 (QDQ), calibrated on task images"
    Options: type[BaseModel] = Int8Recipe
    make = staticmethod(int8_variant)

    def extra(self, ctx: BuildContext, tasks: list[str]) -> list[list]:
        return [[ctx.images[t].calibration for t in tasks], [self.options] * len(tasks)]
