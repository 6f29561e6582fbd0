"""Joint multi-task training: every task at once on one shared backbone.

Each step draws one batch from every task (tasks may be different datasets with different
label sets; an epoch is as many steps as the largest task needs, smaller tasks cycle) and
runs it through that task's norms and head; the loss is the sum of per-task weighted
cross-entropies plus the method's regulariser.

Cost in K tasks: a step does K forward/backward passes, so time grows linearly in K. Each
task's backward runs before the next task's forward (gradients accumulate in the shared
weights), so activation memory is that of one batch whatever K is; parameters grow by K
copies of the per-task parts (norms and heads; a joint TAPS also K dense deltas, each the
size of the layers it gates, with their gradients and momentum).

Methods with an architecture policy (AdaShare) get an epoch of two phases: weights (SGD) on
one half of every task's train split, then the policy (its own optimiser) on the other half.
Determinism and resume as in ``pipeline.train``: every random op is seeded from (seed, epoch)
and model, optimisers and schedule are checkpointed after each epoch.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline.backbones import Backbone
from pipeline.data import Split, TaskData, normalise
from pipeline.methods.base import NORM_TYPES, JointContext, JointMethod
from pipeline.multitask import MultiTaskNet, TaskNorms
from pipeline.train import (MEMORY_FORMAT, Schedule, TrainingError, evaluate, load_checkpoint, save_checkpoint,
                            sgd)


@dataclass
class JointOutcome:
    model: MultiTaskNet
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0  # optimiser steps (each runs every task once)
    step_seconds: float = 0.0
    resumed_from_epoch: int = 0
    candidate: int = 0  # which of the method's candidates this is
    candidates: list[dict] = field(default_factory=list)  # every candidate's final validation
    unit_seconds: float = 0.0  # ``train_joint`` in all: the method's setup (a search) and every candidate

    @property
    def mean_val(self) -> float:
        return self.history[-1]["mean_val_acc"] if self.history else float("-inf")


def train_joint(backbone: Backbone, tasks: dict[str, TaskData], method: JointMethod, schedule: Schedule,
                seed: int, workdir: Path | None = None, signature: str = "", progress: bool = True,
                stop_after_epoch: int | None = None) -> JointOutcome:
    """Train ``method`` on all ``tasks``; with several candidates, keep the best mean validation."""
    workdir = Path(workdir) if workdir is not None else None
    t0 = time.perf_counter()
    method.setup(JointContext(backbone, tasks, schedule, seed, workdir, signature, progress))
    best, seen = None, []
    for i in range(method.candidates):
        method.select(i)
        ckpt = workdir / "scratch" / f"candidate{i}" / "checkpoint.pt" if workdir is not None else None
        out = run_joint(backbone, tasks, method, schedule, seed, ckpt, f"{signature}/candidate{i}", progress,
                        stop_after_epoch, desc=f"{method.name}" + (f" #{i}" if method.candidates > 1 else ""))
        out.candidate = i
        seen.append({"candidate": i, "mean_val_acc": out.mean_val, "train_seconds": round(out.seconds, 2)})
        if best is None or out.mean_val > best.mean_val:
            best = out
    method.select(best.candidate)
    best.candidates = seen
    best.unit_seconds = time.perf_counter() - t0
    return best


def build_model(backbone: Backbone, tasks: dict[str, TaskData], method: JointMethod, seed: int) -> MultiTaskNet:
    heads = {t: backbone.new_head(d.num_classes, seed + i) for i, (t, d) in enumerate(tasks.items())}
    model = MultiTaskNet(copy.deepcopy(backbone.features), heads)
    if method.task_norms:
        model.task_norms(NORM_TYPES)
    method.prepare(model)
    return model.to(memory_format=MEMORY_FORMAT)


def _halves(split: Split) -> tuple[Split, Split]:
    """Every other image: the weights' half and the policy's half, same label mix."""
    return (Split(split.images[0::2], split.labels[0::2]), Split(split.images[1::2], split.labels[1::2]))


def _cycle(split: Split, batch_size: int, gen: torch.Generator):
    while True:
        yield from split.batches(batch_size, gen)


def run_joint(backbone: Backbone, tasks: dict[str, TaskData], method: JointMethod, schedule: Schedule, seed: int,
              ckpt: Path | None = None, signature: str = "", progress: bool = True,
              stop_after_epoch: int | None = None, desc: str = "joint") -> JointOutcome:
    """One joint training of one model (``train_joint`` runs one per candidate)."""
    torch.manual_seed(seed)
    model = build_model(backbone, tasks, method, seed)
    policy = method.policy_parameters(model)
    heads = list(model.heads.parameters())
    skip = {id(p) for p in heads} | {id(p) for p in policy}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
    opt = sgd(heads, body, schedule)
    popt = method.policy_optimizer(policy) if policy else None
    splits = {"weights": {t: d.train for t, d in tasks.items()}}
    if policy:
        halves = {t: _halves(d.train) for t, d in tasks.items()}
        splits = {"weights": {t: h[0] for t, h in halves.items()}, "policy": {t: h[1] for t, h in halves.items()}}
    steps_per_epoch = {ph: math.ceil(max(len(s) for s in sp.values()) / schedule.batch_size) for ph, sp in splits.items()}
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=schedule.epochs * steps_per_epoch["weights"])
    outcome = JointOutcome(model)
    stateful = {"model": model, "optimizer": opt, "scheduler": sched} | ({"policy_optimizer": popt} if popt else {})
    start = 0
    if (state := load_checkpoint(ckpt, signature, stateful)) is not None:
        outcome.history = state["history"]
        start = outcome.resumed_from_epoch = state["epoch"] + 1
    trainable = {"weights": heads + body, "policy": policy}
    t0 = time.perf_counter()
    for epoch in range(start, schedule.epochs):
        torch.manual_seed(seed * 7919 + epoch)
        method.start_epoch(model, epoch)
        losses = {}
        for phase in method.phases(epoch):
            for ph, params in trainable.items():
                for p in params:
                    p.requires_grad_(ph == phase)
            optimiser, scheduler = (opt, sched) if phase == "weights" else (popt, None)
            losses[phase] = _epoch(model, method, splits[phase], backbone, schedule, optimiser, scheduler,
                                   steps_per_epoch[phase], seed, epoch, phase, outcome, progress,
                                   f"{desc} {phase} epoch {epoch + 1}/{schedule.epochs}")
        for p in trainable["weights"] + trainable["policy"]:
            p.requires_grad_(True)
        outcome.history.append({"epoch": epoch + 1, "train_loss": losses, **_validate(model, tasks, backbone)})
        if progress:
            tqdm.write(f"  {desc} epoch {epoch + 1}: loss {losses}, mean val acc {outcome.mean_val:.4f}")
        save_checkpoint(ckpt, signature, epoch, outcome.history, stateful)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    if len(outcome.history) == schedule.epochs and schedule.recalibrate_norms and method.task_norms:
        recalibrate_task_norms(model, tasks, backbone, schedule.batch_size)
        outcome.history[-1].update(_validate(model, tasks, backbone))  # what candidates are compared on
    outcome.seconds = time.perf_counter() - t0
    model.to(memory_format=torch.contiguous_format).eval()
    return outcome


def _validate(model: MultiTaskNet, tasks: dict[str, TaskData], backbone: Backbone) -> dict:
    val = {t: evaluate(model.use(t), d.val, backbone.mean, backbone.std) for t, d in tasks.items()}
    return {"val_acc": val, "mean_val_acc": mean(val.values())}


def _epoch(model: MultiTaskNet, method: JointMethod, splits: dict[str, Split], backbone: Backbone,
           schedule: Schedule, opt: torch.optim.Optimizer, sched, steps: int, seed: int, epoch: int, phase: str,
           outcome: JointOutcome, progress: bool, desc: str) -> float:
    """One pass of ``steps`` steps; each step runs one batch of every task. Returns the mean loss."""
    method.train_mode(model)
    iters = {t: _cycle(s, schedule.batch_size, torch.Generator().manual_seed(seed * 7919 + epoch * 101 + i + (
        50 if phase == "policy" else 0))) for i, (t, s) in enumerate(splits.items())}
    total = 0.0
    for step in tqdm(range(steps), disable=not progress, desc=desc, leave=False):
        t_step = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for t in splits:
            x, y = next(iters[t])
            logits = model.use(t)(normalise(x, backbone.mean, backbone.std).contiguous(memory_format=MEMORY_FORMAT))
            loss = method.task_weight(t) * F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise TrainingError(f"{method.name}/{t}: loss is {loss.item()} at epoch {epoch + 1} step {step + 1} "
                                    f"({phase} phase); lower the lr")
            loss.backward()
            step_loss += loss.item()
        reg = method.regulariser(model, epoch)
        if reg is not None and reg.requires_grad:
            if not torch.isfinite(reg):
                raise TrainingError(f"{method.name}: regulariser is {reg.item()} at epoch {epoch + 1} step {step + 1}")
            reg.backward()
            step_loss += reg.item()
        opt.step()
        if sched is not None:
            sched.step()
        total += step_loss
        outcome.steps += 1
        outcome.step_seconds += time.perf_counter() - t_step
    return round(total / max(1, steps), 5)


@torch.no_grad()
def recalibrate_task_norms(model: MultiTaskNet, tasks: dict[str, TaskData], backbone: Backbone, batch_size: int) -> None:
    """Each task's BatchNorm statistics re-estimated over its own train split (see
    ``pipeline.train.recalibrate_norms``), touching no other task's copies."""
    for i, t in enumerate(model.tasks):
        model.use(t)
        norms = [m.per_task[i] for _, m in model.switches(TaskNorms)
                 if isinstance(m.per_task[i], torch.nn.modules.batchnorm._BatchNorm)]
        momenta = [bn.momentum for bn in norms]
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the whole split
        model.train()
        for x, _ in tasks[t].train.batches(batch_size):
            model(normalise(x, backbone.mean, backbone.std))
        for bn, m in zip(norms, momenta):
            bn.momentum = m
    model.eval()
