"""The export stage: the base and every task's merged model as ONNX, each checked against torch
on the task's test split, the FLOPs of every merged model, then the deployment forms."""
from __future__ import annotations

from pipeline.core.bundle import load_bundle
from pipeline.stages.base import Stage, digest
from pipeline.stages.context import StageContext


class ExportStage(Stage):
    name = "export"

    def inputs(self, ctx: StageContext) -> str:
        from exporters.onnx import EXPORT_FORMAT

        return digest("export", EXPORT_FORMAT, ctx.hashes["fold"], ctx.cfg.export.model_dump())

    def disabled(self, ctx: StageContext) -> str | None:
        return None if ctx.cfg.export.onnx else "disabled in config"

    def run(self, ctx: StageContext) -> dict:
        from exporters.bundles import export_bundles

        c, run = ctx.cfg, ctx.run
        bundles = {m.label: load_bundle(run.bundle(m.label), expect_backbone=c.backbone.name) for m in c.methods}
        images = {t.name: task_images(ctx, t.name) for t in c.tasks}
        record = export_bundles(bundles, run.exports, c.export.forms, images, ctx.backbone.features, c.export.opset,
                                c.run.threads, c.export.form_options(), thresholds(ctx), ctx.log)
        for key, check in record.get("form_checks", {}).items():
            acc = f", accuracy {check['reference_accuracy']:.4f} -> {check['accuracy']:.4f}" if "accuracy" in check else ""
            ctx.log(f"  {key}: max diff {check['max_abs_diff']:.2e}, argmax agreement {check['argmax_agree']:.4f}{acc}")
        record["outputs"] = [run.rel(run.exports / o) for o in record["outputs"]] + [run.rel(run.exports / "export.json")]
        return record


def thresholds(ctx: StageContext):
    from exporters.build import Thresholds

    c = ctx.cfg.checks
    return Thresholds(c.onnx_max_abs_diff, c.min_argmax_agree, c.max_accuracy_drop)


CHECK_BATCH = 64  # onnxruntime on a CPU: 0.42-0.46 ms per image in batches of 16-64, 0.50 at 256 (FP16 0.55 / 0.78)


def test_batches(ctx: StageContext, task: str):
    """The task's test inputs, normalised float32 numpy batches, in order (read as they go)."""
    return (x.numpy() for x, _ in ctx.data(task).test.batches(CHECK_BATCH))


IN_MEMORY_BYTES = 256 << 20  # a test split this small is decoded once and kept for every check


def task_images(ctx: StageContext, task: str):
    """What the forms of a task are checked on: calibration images, and the test split (decoded
    once and kept when it is small, streamed for every check otherwise); exact checks on the
    first ``checks.images`` of it."""
    import numpy as np

    from exporters.images import TaskImages

    data = ctx.data(task)
    calibration = data.train_eval.inputs(limit=ctx.cfg.export.calibration_images).numpy()
    size = ctx.cfg.backbone.image_size
    limit = ctx.cfg.checks.images
    if len(data.test) * 3 * size * size * 4 <= IN_MEMORY_BYTES:
        pairs = [(x.numpy(), y.numpy()) for x, y in data.test.batches(CHECK_BATCH)]
        xs = [x for x, _ in pairs]
        labels = np.concatenate([y for _, y in pairs]) if pairs else np.zeros(0, np.int64)
        return TaskImages(calibration, lambda: iter(xs), labels, limit)
    labels = np.concatenate([y.numpy() for _, y in data.test.batches(CHECK_BATCH)])  # of the images that decode
    return TaskImages(calibration, lambda: test_batches(ctx, task), labels, limit)
