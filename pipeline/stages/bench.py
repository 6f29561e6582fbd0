"""The bench stage: onnxruntime latency of the base and every merged model in one interleaved
run (a second base session is the noise floor), then every deployment form. With the forms
benched, the merged models are timed once, among the forms, and that one run gives both."""
from __future__ import annotations

from pipeline.stages.base import Stage, digest
from pipeline.stages.context import StageContext


class BenchStage(Stage):
    name = "bench"

    def inputs(self, ctx: StageContext) -> str:
        c = ctx.cfg
        return digest("bench", ctx.hashes["export"], c.bench.model_dump(), c.run.threads)

    def disabled(self, ctx: StageContext) -> str | None:
        return None if ctx.cfg.export.onnx else "nothing exported (export.onnx is off)"

    def run(self, ctx: StageContext) -> dict:
        c, run = ctx.cfg, ctx.run
        forms = (run.record("export") or {}).get("forms") if c.bench.forms else None
        deploy = {}
        if forms:
            from exporters.bench import bench_forms

            deploy = bench_forms(run.exports, forms, c.backbone.image_size, c.bench.batch_sizes, c.bench.warmup,
                                 c.bench.runs, c.run.threads, log=ctx.log)
            measured = deploy.pop("measured")
            keys = {"base": "base", "base_repeat": "base_repeat"} | {
                f"{m.label}/{t.name}": f"{m.label}|merged|{t.name}" for m in c.methods for t in c.tasks}
            latency = {b: {k: dict(res[target]) for k, target in keys.items()} for b, res in measured.items()}
        else:
            latency = self.merged_latency(ctx)
        for res in latency.values():
            base = res["base"]["median_ms"]
            for r in res.values():
                r["ratio_to_base"] = r["median_ms"] / base
        return {"latency": latency, "threads": c.run.threads, "deploy": deploy}

    @staticmethod
    def merged_latency(ctx: StageContext) -> dict:
        """The base (twice) and every merged model, interleaved, per batch size."""
        from exporters.latency import measure
        from exporters.runtime import session

        c, run = ctx.cfg, ctx.run
        files = {"base": run.base_export, "base_repeat": run.base_export}
        for m in c.methods:
            for t in c.tasks:
                files[f"{m.label}/{t.name}"] = run.export(m.label, t.name)
        sessions = {k: session(p, c.run.threads) for k, p in files.items()}
        latency = {}
        for bs in c.bench.batch_sizes:
            ctx.log(f"bench: onnxruntime CPU, batch {bs}, {len(sessions)} models, {c.bench.runs} runs each")
            latency[f"batch{bs}"] = measure(sessions, c.backbone.image_size, bs, c.bench.warmup, c.bench.runs)
        return latency
