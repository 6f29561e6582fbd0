"""The train stage: every entry's training units, each skipped when its result holds its hash.

* incremental entries: one unit per task, independent of each other;
* pool entries (CWPS): one unit per (pass, task) in order; a unit's hash chains the hashes of
  the units before it (it borrows from them), and the pool ledger tracks the version each task
  keeps;
* joint entries: one unit for all tasks (``train/<label>/@joint/``), which also writes every
  task's delta and result where incremental entries have them, so fold and report read both
  alike. An entry with ``base: <joint label>`` starts from that unit's shared weights, and its
  hashes include that unit's.

Every unit checks that its folded delta reproduces the trained model before anything is written.
"""
from __future__ import annotations

import dataclasses
import shutil

from safetensors.torch import save_file

from pipeline.config import MethodEntry
from pipeline.core.backbones import TaskNet
from pipeline.core.bundle import base_state
from pipeline.core.compare import compare_logits, model_logits, within
from pipeline.core.delta import TaskDelta, read_delta, write_delta
from pipeline.core.errors import TaskfoldError
from pipeline.core.fold import merge
from pipeline.core.io import atomic_path, read_json, write_json
from pipeline.core.versions import version_pass
from pipeline.methods import REGISTRY, build_method
from pipeline.methods.context import Schedule
from pipeline.stages import helpers
from pipeline.stages.base import Stage, digest
from pipeline.stages.context import StageContext
from pipeline.stages.records import step_ms, task_result
from pipeline.stages.units import (done, done_joint, joint_finished, joint_hashes_of, passes, unit_hashes,
                                   untrained)
from pipeline.training.evaluate import SAMPLE_IMAGES, Sample, evaluate, evaluate_with_sample
from pipeline.training.incremental import train_task
from pipeline.training.joint import train_joint
from pipeline.training.pool import PoolLedger

class FoldError(TaskfoldError, RuntimeError):
    """The merged model does not reproduce the adapted one."""


class TrainStage(Stage):
    name = "train"

    def run(self, ctx: StageContext) -> dict:
        jobs = ctx.cfg.run.jobs
        # helpers only where there is something to train: on a finished run they would only start and stop
        if jobs > 1 and ctx.job == (0, 1) and not ctx.runtime.distributed and untrained(ctx):
            return helpers.train_in_processes(self, ctx, jobs)
        return self.train_units(ctx)

    def train_units(self, ctx: StageContext) -> dict:
        """One pass over every entry's units in this job's order: train what is not up to date,
        is this job's to train and is not held by another job."""
        methods = ctx.cfg.methods
        joint_hashes = joint_hashes_of(ctx)
        units: dict[str, str] = {}
        ctx.pending = []
        for position in helpers.entry_order(len(methods), *ctx.job):
            entry = methods[position]
            if REGISTRY[entry.name].trainer == "joint":
                units |= train_joint_entry(ctx, entry, joint_hashes, position)
            else:
                units |= train_task_entry(ctx, entry, joint_hashes, position)
        ctx.hashes["train"] = digest(units)
        return {"units": units, "pending": list(ctx.pending)}


def schedule(ctx: StageContext, entry: MethodEntry) -> Schedule:
    t = ctx.cfg.train
    i = ctx.cfg.methods.index(entry)
    return Schedule(entry.epochs if entry.epochs is not None else t.epochs, t.batch_size,
                    entry.lr if entry.lr is not None else t.lr, t.momentum, t.weight_decay, t.head_lr_scale,
                    t.recalibrate_norms, f"methods[{i}].lr" if entry.lr is not None else "train.lr",
                    dict(entry.optim), dict(t.optim), t.validate_every)


def waits_for(ctx: StageContext, entry: MethodEntry, joint_hashes: dict[str, str]) -> str | None:
    """What an entry's units need that is not there yet: the joint unit its ``base`` names."""
    if entry.base and not done_joint(ctx, entry.base, joint_hashes.get(entry.base, "")):
        return f"{entry.base}/joint (its base)"
    return None


def attempt(ctx: StageContext, key: str, position: int, unit, wait: str | None, train, finished) -> bool:
    """Train a unit that is not up to date if this job's selection has it, nothing it needs is
    missing and no live job holds its lock; else say why it is left. True if it is there now
    (``finished()`` is asked again under the lock: another job may have just finished it)."""
    if not ctx.selection.wants(position, key):
        ctx.log(f"train {key}: left to another job (not in this job's --shard/--units)")
    elif wait:
        ctx.log(f"train {key}: waits for {wait}; left for a later job")
    else:
        with ctx.claim(unit) as mine:
            if mine:
                if finished():
                    ctx.log(f"train {key}: finished by another job meanwhile")
                else:
                    train()
                return True
            ctx.log(f"train {key}: being trained by another job ({ctx.lock_holder(unit)}); left to it")
    ctx.pending.append(key)
    return False


def train_task_entry(ctx: StageContext, entry: MethodEntry, joint_hashes: dict[str, str],
                     position: int = 0) -> dict[str, str]:
    """Train every task of one entry, pass after pass; a pool method's unit sees the versions
    trained before it and borrows from the one each task keeps (best validation). A pool
    entry's units go to one job together (``position`` is the entry's), in order."""
    pool_method = REGISTRY[entry.name].trainer == "pool"
    n = passes(entry)
    ledger, units = PoolLedger(), {}
    missing = None  # the first unit of a pool chain that is not there: the later ones wait for it
    for i, (p, task, unit, h) in enumerate(unit_hashes(ctx, entry, joint_hashes)):
        key = f"{entry.label}/{task}" + (f"/pass{p}" if n > 1 else "")
        tag = f"{entry.label}/{task}" + (f" pass {p}/{n}" if n > 1 else "")
        units[key] = h
        if done(unit, h):
            ctx.log(f"train {tag}: up to date, skipped")
        else:
            wait = waits_for(ctx, entry, joint_hashes) or (missing if pool_method else None)
            trained = attempt(ctx, key, position if pool_method else position * 10_000 + i, unit, wait,
                              lambda: train_unit(ctx, entry, task, unit, h, tag, ledger.versions if pool_method else {},
                                                 ledger.pool() if pool_method else []),
                              lambda: done(unit, h))
            if not trained:
                missing = missing or key
                continue
        if pool_method or n > 1:  # later units read this one's delta, or passes are compared
            ledger.add(task, p, read_delta(unit / "delta.safetensors"), read_json(unit / "result.json"))
    if n > 1 and not missing:
        for task, vid in ledger.final().items():
            best = read_json(ctx.run.unit(entry.label, task, version_pass(vid)) / "result.json")
            write_json(ctx.run.result_file(entry.label, task), best | {"kept": vid, "passes": ledger.history[task]})
    return units


def fold_check(ctx: StageContext, model, base: TaskNet, delta: TaskDelta, tag: str, sample: Sample | None) -> dict:
    """Does ``delta`` merged onto ``base`` reproduce ``model`` on the task's test images? In
    float32, on the device the unit trained on (``delta`` and ``base`` are on the CPU). In one
    process, on ``sample`` (the first test images the test evaluation ran, with ``model``'s
    logits, so ``model`` is not run again); several processes would each check other images,
    so they all check the first ``SAMPLE_IMAGES`` test images and reach the same verdict."""
    device = next(model.parameters()).device
    if sample is None or ctx.runtime.distributed:
        x = ctx.images(delta.task, limit=SAMPLE_IMAGES).to(device)
        sample = Sample(x, model_logits(model, x))
    check = compare_logits(sample.logits, model_logits(merge(base, delta).to(device), sample.inputs))
    tol = ctx.cfg.checks.fold_max_abs_diff
    if not within(check, tol) or check["argmax_agree"] < 1.0:  # NaN fails the first test too
        raise FoldError(f"{tag}: the merged model differs from the trained one on the test images: max |logit "
                        f"difference| {check['max_abs_diff']:.3g} (checks.fold_max_abs_diff {tol:g} x the largest "
                        f"logit {max(1.0, check['scale']):.3g}), argmax agreement "
                        f"{check['argmax_agree']:.4f}; nothing of this unit was written")
    return check


def train_unit(ctx: StageContext, entry: MethodEntry, task: str, unit, h: str, tag: str, versions: dict,
               pool: list[str]) -> None:
    sched = schedule(ctx, entry)
    data = ctx.data(task)
    backbone = ctx.start_backbone(entry)
    method = build_method(entry.name, entry.params)
    ctx.log(f"train {tag}: {sched.epochs} epochs, lr {sched.lr}, {len(data.train)} images"
            + (f", pool: base + {', '.join(pool)}" if pool else "")
            + (f", from {entry.base}'s shared weights" if entry.base else ""))
    rt = ctx.runtime
    outcome = train_task(backbone, data, method, sched, ctx.cfg.run.seed, unit, h, ctx.progress,
                         versions=versions, pool=pool, runtime=rt, log=ctx.log)
    if outcome.record.resumed_from_epoch:
        ctx.log(f"  resumed from epoch {outcome.record.resumed_from_epoch}")
    model = outcome.model
    delta = method.task_delta(model, task).to("cpu").link(versions)
    delta.classes = list(data.classes)
    test_acc, sample = evaluate_with_sample(model, data.test, rt)
    check = fold_check(ctx, model, backbone.base_net(), delta, tag, sample)
    rec = outcome.record
    result = task_result(h, entry, task, evaluate(model, data.val, rt), test_acc, rec.history, rec.seconds,
                         step_ms(rec.steps, rec.step_seconds), check, method.describe(model, task),
                         skipped=outcome.skipped_images)
    if rt.main:
        with atomic_path(unit / "delta.safetensors") as tmp:
            write_delta(tmp, delta)
        write_json(unit / "result.json", result)
        (unit / "checkpoint.pt").unlink(missing_ok=True)
        shutil.rmtree(unit / "scratch", ignore_errors=True)
    rt.barrier()
    ctx.log(f"  {tag}: test acc {result['test_acc']:.4f}, fold max diff {check['max_abs_diff']:.2e}")


def train_joint_entry(ctx: StageContext, entry: MethodEntry, joint_hashes: dict[str, str],
                      position: int = 0) -> dict[str, str]:
    """One unit for all tasks."""
    names = [t.name for t in ctx.cfg.tasks]
    h = joint_hashes[entry.label]
    unit = ctx.run.joint_unit(entry.label)
    key = f"{entry.label}/joint"

    def finished() -> bool:
        return joint_finished(ctx, entry.label, h)

    if finished():
        ctx.log(f"train {entry.label} (joint, {len(names)} tasks): up to date, skipped")
    else:
        attempt(ctx, key, position * 10_000, unit, waits_for(ctx, entry, joint_hashes),
                lambda: train_joint_unit(ctx, entry, unit, h), finished)
    return {key: h}


def train_joint_unit(ctx: StageContext, entry: MethodEntry, unit, h: str) -> None:
    sched = schedule(ctx, entry)
    method = build_method(entry.name, entry.params)
    tasks = {t.name: ctx.data(t.name) for t in ctx.cfg.tasks}
    ctx.log(f"train {entry.label}: joint over {len(tasks)} tasks, {sched.epochs} epochs, lr {sched.lr}, "
            f"one batch of every task per step" + (f", from {entry.base}'s shared weights" if entry.base else ""))
    rt = ctx.runtime
    outcome = train_joint(ctx.start_backbone(entry), tasks, method, sched, ctx.cfg.run.seed, unit, h, ctx.progress,
                          runtime=rt, image_size=ctx.cfg.backbone.image_size, log=ctx.log)
    model = outcome.model
    base = model.shared_base().to("cpu")
    rec = outcome.record
    seconds = outcome.unit_seconds  # a search and every variant included
    per_step = step_ms(rec.steps, rec.step_seconds)
    deltas = {task: method.task_delta(model, task).to("cpu") for task in tasks}
    for task, d in deltas.items():
        d.classes = list(tasks[task].classes)
    results, checks = {}, {}
    for task, data in tasks.items():  # every task checked before anything is written
        test_acc, sample = evaluate_with_sample(model.use(task), data.test, rt)
        checks[task] = fold_check(ctx, model.use(task), base, deltas[task], f"{entry.label}/{task}", sample)
        history = [{"epoch": e["epoch"], **({"val_acc": e["val_acc"][task]} if "val_acc" in e else {})}
                   for e in rec.history]
        results[task] = task_result(h, entry, task, evaluate(model.use(task), data.val, rt), test_acc, history,
                                    seconds, per_step, checks[task], method.describe(model, task), joint=True)
    if rt.main:
        for task, result in results.items():
            with atomic_path(ctx.run.delta_file(entry.label, task)) as tmp:
                write_delta(tmp, deltas[task])
            write_json(ctx.run.result_file(entry.label, task), result)
        with atomic_path(ctx.run.shared_weights(entry.label)) as tmp:
            save_file(base_state(dataclasses.replace(ctx.backbone, features=base.features)), str(tmp))
        write_json(unit / "result.json", {"hash": h, "history": rec.history, "candidates": outcome.candidates,
                                          "kept_candidate": outcome.candidate, "train_seconds": round(seconds, 2),
                                          "step_ms": per_step})
        shutil.rmtree(unit / "scratch", ignore_errors=True)
    rt.barrier()
    for task, result in results.items():
        ctx.log(f"  {entry.label}/{task}: test acc {result['test_acc']:.4f}, "
                f"fold max diff {checks[task]['max_abs_diff']:.2e}")
    ctx.forget_joint_base(entry.label)
