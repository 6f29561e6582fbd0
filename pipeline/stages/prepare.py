"""The prepare stage: every task's source read, split (seeded), shifted and resized, all or
nothing (a task that cannot be read stops the stage before anything is written)."""
from __future__ import annotations

from safetensors.torch import save_file

from pipeline.core.io import atomic_path
from pipeline.data import load_task
from pipeline.stages.base import Stage, digest
from pipeline.stages.context import StageContext


class PrepareStage(Stage):
    name = "prepare"

    def inputs(self, ctx: StageContext) -> str:
        c = ctx.cfg
        return digest("prepare", c.backbone.model_dump(), [t.model_dump() for t in c.tasks], c.run.seed)

    def run(self, ctx: StageContext) -> dict:
        c = ctx.cfg
        ctx.log(f"prepare: {len(c.tasks)} tasks at {c.backbone.image_size}px, backbone {c.backbone.name}")
        loaded = {t.name: load_task(t, c.backbone.image_size, c.run.seed) for t in c.tasks}  # all or nothing
        outputs, tasks = [], {}
        for t in c.tasks:
            data = loaded[t.name]
            path = ctx.run.prepared(t.name)
            with atomic_path(path) as tmp:
                save_file(data.tensors(), str(tmp), metadata={"num_classes": str(data.num_classes)})
            ctx.keep_data(data)
            outputs.append(ctx.run.rel(path))
            tasks[t.name] = {"num_classes": data.num_classes, "train": len(data.train), "val": len(data.val),
                             "test": len(data.test), "domain": t.domain, "source": t.source.type}
            ctx.log(f"  {t.name}: {tasks[t.name]}")
        return {"outputs": outputs, "tasks": tasks}
