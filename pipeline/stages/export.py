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
        from exporters.build import CheckFailed
        from exporters.compute import count_flops
        from exporters.onnx import OnnxExporter, base_model, parity
        from exporters.runtime import session

        c, run = ctx.cfg, ctx.run
        exporter = OnnxExporter(c.backbone.image_size, c.export.opset)
        first = c.tasks[0].name
        base = base_model(ctx.backbone.features, ctx.backbone.num_features, ctx.data(first).num_classes)
        outputs = [run.rel(run.base_export)]
        exporter.export(base, run.base_export)
        results, flops = {}, {"base": count_flops(base, c.backbone.image_size)}
        bundles = {m.label: load_bundle(run.bundle(m.label), expect_backbone=c.backbone.name) for m in c.methods}
        for label, bundle in bundles.items():
            for task in bundle.tasks:
                path = run.export(label, task)
                merged = bundle.merged(task)
                flops[f"{label}/{task}"] = count_flops(merged, c.backbone.image_size)
                exporter.export(merged, path)
                check = parity(merged, session(path, c.run.threads), test_batches(ctx, task))
                if reason := thresholds(ctx).verdict(check, lossy=False):
                    path.unlink(missing_ok=True)
                    raise CheckFailed(f"{run.rel(path)}: ONNX Runtime does not reproduce torch on the test images: "
                                      f"{reason}; the file was removed")
                results[f"{label}/{task}"] = check
                outputs.append(run.rel(path))
                ctx.log(f"export {run.rel(path)}: max |onnx - torch| {check['max_abs_diff']:.2e}, "
                        f"argmax agreement {check['argmax_agree']:.4f} on {check['images']} test images")
        forms = {}
        if c.export.forms:
            forms = export_forms(ctx, exporter, bundles)
            outputs.append(run.rel(run.forms_file))
        ctx.log(f"export: {len(outputs)} ONNX files from {exporter.traces} trace(s)")
        return {"outputs": outputs, "parity": results, "flops": flops, "traces": exporter.traces, **forms}


def thresholds(ctx: StageContext):
    from exporters.build import Thresholds

    c = ctx.cfg.checks
    return Thresholds(c.onnx_max_abs_diff, c.min_argmax_agree, c.max_accuracy_drop)


def test_batches(ctx: StageContext, task: str):
    """The task's test inputs, normalised float32 numpy batches, in order (read as they go)."""
    return (x.numpy() for x, _ in ctx.data(task).test.batches(256))


def task_images(ctx: StageContext, task: str):
    """What the forms of a task are checked on: calibration images, the test split streamed."""
    import numpy as np

    from exporters.images import TaskImages

    data = ctx.data(task)
    calibration = data.train_eval.inputs(limit=ctx.cfg.export.calibration_images).numpy()
    labels = np.concatenate([y.numpy() for _, y in data.test.batches(256)])  # of the images that decode
    return TaskImages(calibration, lambda: test_batches(ctx, task), labels)


def export_forms(ctx: StageContext, exporter, bundles: dict) -> dict:
    from exporters.build import build_forms

    c = ctx.cfg
    ctx.log(f"export: deployment forms {', '.join(c.export.forms)}")
    images = {t.name: task_images(ctx, t.name) for t in c.tasks}
    built = build_forms(ctx.run.exports, exporter, c.export.forms, bundles, images, c.run.threads,
                        c.export.form_options(), ctx.log, thresholds(ctx))
    for key, check in built["checks"].items():
        acc = f", accuracy {check['reference_accuracy']:.4f} -> {check['accuracy']:.4f}" if "accuracy" in check else ""
        ctx.log(f"  {key}: max diff {check['max_abs_diff']:.2e}, argmax agreement {check['argmax_agree']:.4f}{acc}")
    return {"forms": built["forms"], "form_checks": built["checks"]}
