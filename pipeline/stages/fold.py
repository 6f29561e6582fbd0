"""The fold stage: every entry's kept task deltas into one bundle (base once + one file per task)."""
from __future__ import annotations

from pipeline.config import MethodEntry
from pipeline.core.bundle import backbone_id, write_bundle
from pipeline.core.delta import TaskDelta, read_delta
from pipeline.core.io import read_json, sha256_file
from pipeline.core.versions import version_id
from pipeline.methods import REGISTRY, build_method
from pipeline.methods.base import PoolMethod
from pipeline.stages.base import Stage, digest
from pipeline.stages.context import StageContext
from pipeline.stages.units import units_of


class FoldStage(Stage):
    name = "fold"

    def inputs(self, ctx: StageContext) -> str:
        return digest("fold", ctx.hashes["train"])

    def fresh(self, ctx: StageContext, record: dict) -> str | None:
        """The manifests as written, and every file of every bundle as its manifest lists it."""
        if changed := super().fresh(ctx, record):
            return changed
        for m in ctx.cfg.methods:
            root = ctx.run.bundle(m.label)
            for rel, rec in read_json(root / "manifest.json")["files"].items():
                p = root / rel
                if not p.is_file() or p.stat().st_size != rec["bytes"] or sha256_file(p) != rec["sha256"]:
                    return f"{ctx.run.rel(p)} changed since its bundle was written"
        return None

    def run(self, ctx: StageContext) -> dict:
        c = ctx.cfg
        prepared = ctx.run.record("prepare")["tasks"]
        ledgers = {}
        for m in c.methods:
            deltas = bundle_deltas(ctx, m)
            backbone = ctx.bundle_backbone(m)
            shared = m.label if REGISTRY[m.name].trainer == "joint" else m.base
            weights = c.backbone.weights + (f" + joint training ({shared})" if shared else "")
            manifest = write_bundle(
                ctx.run.bundle(m.label), backbone, backbone_id(backbone, weights, c.backbone.image_size), deltas,
                {"name": m.name, "label": m.label, "params": m.params.model_dump(mode="json")},
                {t.name: prepared[t.name]["num_classes"] for t in c.tasks},
                {t.name: {"crop_pct": t.crop_pct if t.crop_pct is not None else ctx.pools(t.name).crop_pct}
                 for t in c.tasks},
            )
            ledgers[m.label] = manifest["ledger"]
            ctx.log(f"fold {m.label}: {manifest['ledger']['total']['n_x_base']:.3f} x base, "
                    f"{manifest['ledger']['total']['bytes_on_disk']:,} bytes")
        return {"outputs": [ctx.run.rel(ctx.run.bundle(m.label) / "manifest.json") for m in c.methods],
                "ledgers": ledgers}


def entry_versions(ctx: StageContext, entry: MethodEntry) -> tuple[dict[str, str], dict[str, TaskDelta]]:
    """(task -> the version it kept, every version's delta, linked) of a trained entry."""
    versions = {vid: read_delta(unit / "delta.safetensors") for _, _, unit, vid in units_of(ctx, entry)}
    for d in versions.values():
        d.link(versions)
    final = {t.name: read_json(ctx.run.result_file(entry.label, t.name)).get("kept", version_id(t.name, 1))
             for t in ctx.cfg.tasks}
    return final, versions


def bundle_deltas(ctx: StageContext, entry: MethodEntry) -> list[TaskDelta]:
    """The deltas an entry's bundle stores: each task's (a pool entry's: the version it kept,
    with pointers rewritten to tasks)."""
    method = build_method(entry.name, entry.params)
    final, versions = entry_versions(ctx, entry)
    if isinstance(method, PoolMethod):
        return method.bundle_deltas(final, versions)
    return [versions[v] for v in final.values()]
