"""The prepare stage: every task's source opened and split (seeded) into an index of items and
labels, all or nothing (a task that cannot be read stops the stage before anything is written).
No pixels are stored: ``prepared/<task>.json`` is the index; images are read while training.

File sources have every image's header read here (the format identified, the size known), so a
file that is not an image is named now rather than mid-training; a file whose data is corrupt
further in (a truncated JPEG) is found when it is decoded.
"""
from __future__ import annotations

from pipeline.core.io import write_json
from pipeline.data import DataError, build_index
from pipeline.stages.base import Stage, digest
from pipeline.stages.context import StageContext


class PrepareStage(Stage):
    name = "prepare"

    def inputs(self, ctx: StageContext) -> str:
        c = ctx.cfg
        sources = [ctx.pools(t.name).fingerprint for t in c.tasks]
        return digest("prepare", c.backbone.model_dump(), [t.model_dump() for t in c.tasks], c.run.seed, sources)

    def run(self, ctx: StageContext) -> dict:
        c = ctx.cfg
        ctx.log(f"prepare: {len(c.tasks)} tasks at {c.backbone.image_size}px, backbone {c.backbone.name}")
        indexes, skipped = {}, {}
        for t in c.tasks:  # all or nothing: every task indexed before any file is written
            pools = ctx.pools(t.name)
            bad = check_headers(pools, t.name, c.data.on_bad_image)
            if bad:
                skipped[t.name] = bad
                pools = drop(pools, set(bad))
            indexes[t.name] = build_index(t, pools, c.run.seed)
        outputs, tasks = [], {}
        for t in c.tasks:
            index = indexes[t.name]
            path = ctx.run.prepared(t.name)
            write_json(path, index.to_json())
            outputs.append(ctx.run.rel(path))
            tasks[t.name] = {"num_classes": index.num_classes, **index.sizes(), "domain": t.domain,
                             "source": t.source.type}
            ctx.log(f"  {t.name}: {tasks[t.name]}")
            for note in index.notes:
                ctx.log(f"  {t.name}: {note}")
            if t.name in skipped:
                tasks[t.name]["skipped_images"] = skipped[t.name]
                ctx.log(f"  {t.name}: skipped {len(skipped[t.name])} file(s) that are not images "
                        f"(data.on_bad_image: skip): {', '.join(list(skipped[t.name])[:3])}")
        return {"outputs": outputs, "tasks": tasks}


def check_headers(pools, task: str, policy: str) -> dict[str, str]:
    """Read every file's image header; the files that are not images (path -> error)."""
    from PIL import Image

    pool_of = {item: name for name, pool in (("train", pools.train), ("val", pools.val), ("test", pools.test))
               if pool for item in pool[0]}
    bad = {}
    for item in pools.files:
        path = pools.reader.root / item
        try:
            with Image.open(path) as img:
                img.size  # noqa: B018  (the header is parsed on open; the size proves it)
        except Exception as err:  # noqa: BLE001  (PIL raises several types for non-images)
            if policy == "error":
                raise DataError(f"{path}: not a readable image ({type(err).__name__}: {err}); task {task!r}, "
                                f"{pool_of.get(item, 'train')} split. Fix or remove the file, or set "
                                "data.on_bad_image: skip") from None
            bad[item] = f"{type(err).__name__}: {err}"
    return bad


def drop(pools, bad: set[str]):
    """``pools`` without the items in ``bad``."""
    from dataclasses import replace

    def keep(pool):
        if pool is None:
            return None
        items, labels = pool
        kept = [(i, y) for i, y in zip(items, labels) if i not in bad]
        return [i for i, _ in kept], [y for _, y in kept]

    return replace(pools, train=keep(pools.train), test=keep(pools.test), val=keep(pools.val),
                   files=[f for f in pools.files if f not in bad])
