"""Which training units a run has, what each one's hash is, and which are up to date: a unit
is done when its result holds its hash. The train stage trains what is not; the fold stage and
the helpers' start read the same facts.

A unit's hash covers the prepared data, the entry, the task, the train section (but how often
it validates) and the seed; a
pool unit's also the units before it (it borrows from them), and an entry with ``base`` the
joint unit it starts from.
"""
from __future__ import annotations

from pipeline.config import MethodEntry
from pipeline.core.io import read_json
from pipeline.core.versions import version_id
from pipeline.methods import REGISTRY, build_method
from pipeline.methods.base import PoolMethod
from pipeline.stages.base import digest
from pipeline.stages.context import StageContext


def unit_hash(ctx: StageContext, entry: MethodEntry, task, joint_hashes: dict[str, str], earlier: list[str] = (),
              pass_: int = 1) -> str:
    """A unit's input hash; ``earlier``: the hashes of the units it borrows from (pool methods)."""
    cfg = ctx.cfg
    described = next(m for m in cfg.to_jsonable()["methods"] if m["label"] == entry.label)
    extra = [list(earlier), pass_] if earlier or pass_ > 1 else []
    if entry.base:
        extra.append(joint_hashes[entry.base])
    train = cfg.train.model_dump(exclude={"validate_every"})  # what decides the trained weights
    return digest("train", ctx.hashes["prepare"], described, task, train, cfg.run.seed, *extra)


def joint_unit_hash(ctx: StageContext, entry: MethodEntry, joint_hashes: dict[str, str]) -> str:
    """The hash of a joint entry's one unit (for every task); ``joint_hashes``: the joint entries before it."""
    return unit_hash(ctx, entry, [t.name for t in ctx.cfg.tasks], joint_hashes)


def joint_hashes_of(ctx: StageContext) -> dict[str, str]:
    """Each joint entry's unit hash, in config order (a later one may start from an earlier's base)."""
    hashes: dict[str, str] = {}
    for entry in ctx.cfg.methods:
        if REGISTRY[entry.name].trainer == "joint":
            hashes[entry.label] = joint_unit_hash(ctx, entry, hashes)
    return hashes


def passes(entry: MethodEntry) -> int:
    method = build_method(entry.name, entry.params)
    return method.passes if isinstance(method, PoolMethod) else 1


def units_of(ctx: StageContext, entry: MethodEntry):
    """(pass, task, unit folder, version id) of every unit of an incremental or pool entry, in order."""
    n = passes(entry)
    for p in range(1, n + 1):
        for t in ctx.cfg.tasks:
            yield p, t.name, ctx.run.unit(entry.label, t.name, p if n > 1 else None), version_id(t.name, p)


def unit_hashes(ctx: StageContext, entry: MethodEntry, joint_hashes: dict[str, str]):
    """(pass, task, unit folder, hash) of every unit of an incremental or pool entry, in order; a
    pool unit's hash covers the units before it (it borrows from them)."""
    pool_method = REGISTRY[entry.name].trainer == "pool"
    chain: list[str] = []
    for p, task, unit, _ in units_of(ctx, entry):
        h = unit_hash(ctx, entry, task, joint_hashes, chain if pool_method else [], p)
        chain.append(h)
        yield p, task, unit, h


def done(unit, h: str) -> bool:
    res = unit / "result.json"
    return res.is_file() and read_json(res).get("hash") == h and (unit / "delta.safetensors").is_file()


def done_joint(ctx: StageContext, label: str, h: str) -> bool:
    res = ctx.run.joint_unit(label) / "result.json"
    return res.is_file() and read_json(res).get("hash") == h and ctx.run.shared_weights(label).is_file()


def joint_finished(ctx: StageContext, label: str, h: str) -> bool:
    """The joint unit is up to date and every task's delta was written from it."""
    return done_joint(ctx, label, h) and all(ctx.run.delta_file(label, t.name).is_file() for t in ctx.cfg.tasks)


def untrained(ctx: StageContext) -> bool:
    """Whether any unit of the run is not up to date (helper processes are started only then)."""
    joint_hashes = joint_hashes_of(ctx)
    for entry in ctx.cfg.methods:
        if REGISTRY[entry.name].trainer == "joint":
            if not joint_finished(ctx, entry.label, joint_hashes[entry.label]):
                return True
        elif not all(done(unit, h) for _, _, unit, h in unit_hashes(ctx, entry, joint_hashes)):
            return True
    return False
