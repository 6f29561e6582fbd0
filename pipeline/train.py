"""Incremental training of one (method, task): SGD + cosine, checkpoint per epoch, resume.

Determinism: the data order and every random op of an epoch are seeded from
(seed, epoch), and model, optimiser and schedule state are checkpointed, so a run killed
and resumed gives the same weights as one that never stopped.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline.backbones import Backbone, TaskNet
from pipeline.data import Split, TaskData, normalise
from pipeline.io import atomic_path
from pipeline.delta import TaskDelta
from pipeline.methods.base import Method, TrainContext


# NHWC is ~15% faster per CPU training step for EfficientNet-Lite0's depthwise convs
# (456 -> 387 ms fine-tune, 464 -> 401 ms TAPS at batch 64, 64 px, 2 threads)
MEMORY_FORMAT = torch.channels_last


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, a checkpoint from another run); says where."""


@dataclass
class Schedule:
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    head_lr_scale: float = 1.0  # the new, randomly initialised head learns this much faster
    recalibrate_norms: bool = True


@dataclass
class TrainOutcome:
    model: TaskNet
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # wall time of this call: steps, validation, norm re-estimation
    steps: int = 0  # optimiser steps taken in this call
    step_seconds: float = 0.0  # time inside those steps only (forward, backward, update)
    resumed_from_epoch: int = 0


@torch.no_grad()
def evaluate(model: TaskNet, split: Split, mean, std, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for x, y in split.batches(batch_size):
        correct += int((model(normalise(x, mean, std)).argmax(1) == y).sum())
    return correct / max(1, len(split))


def train_task(backbone: Backbone, data: TaskData, method: Method, schedule: Schedule, seed: int,
               workdir: Path | None = None, signature: str = "", progress: bool = True,
               stop_after_epoch: int | None = None, versions: dict[str, TaskDelta] | None = None,
               pool: list[str] | None = None) -> TrainOutcome:
    """Train ``method`` on ``data``; checkpoint to ``workdir/checkpoint.pt`` after every epoch.

    ``signature`` identifies the run (config hash); a checkpoint with another signature is
    refused rather than silently mixed in. ``stop_after_epoch`` ends early (tests of resume).
    ``versions``/``pool``: earlier units' deltas, for methods that borrow from them.
    """
    method.setup(TrainContext(backbone, data, schedule, seed, Path(workdir) if workdir is not None else None,
                              signature, progress, dict(versions or {}), list(pool or [])))
    torch.manual_seed(seed)
    model = backbone.task_net(data.num_classes, seed).to(memory_format=MEMORY_FORMAT)
    method.prepare(model)
    head = {id(p) for p in model.head.parameters()}
    opt = sgd(list(model.head.parameters()),
              [p for p in model.parameters() if p.requires_grad and id(p) not in head], schedule)
    steps_per_epoch = math.ceil(len(data.train) / schedule.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=schedule.epochs * steps_per_epoch)
    outcome = TrainOutcome(model)
    ckpt = Path(workdir) / "checkpoint.pt" if workdir is not None else None
    stateful = {"model": model, "optimizer": opt, "scheduler": sched}
    start = 0
    if (state := load_checkpoint(ckpt, signature, stateful)) is not None:
        outcome.history = state["history"]
        start = outcome.resumed_from_epoch = state["epoch"] + 1
    t0 = time.perf_counter()
    for epoch in range(start, schedule.epochs):
        torch.manual_seed(seed * 7919 + epoch)
        gen = torch.Generator().manual_seed(seed * 7919 + epoch)
        method.start_epoch(model, epoch)
        method.train_mode(model)
        total, count = 0.0, 0
        bar = tqdm(data.train.batches(schedule.batch_size, gen), total=steps_per_epoch, disable=not progress,
                   desc=f"{method.name}/{data.name} epoch {epoch + 1}/{schedule.epochs}", leave=False)
        for step, (x, y) in enumerate(bar):
            t_step = time.perf_counter()
            logits = model(normalise(x, backbone.mean, backbone.std).contiguous(memory_format=MEMORY_FORMAT))
            loss = F.cross_entropy(logits, y)
            reg = method.regulariser(model, epoch)
            if reg is not None:
                loss = loss + reg
            if not torch.isfinite(loss):
                raise TrainingError(f"{method.name}/{data.name}: loss is {loss.item()} at epoch {epoch + 1} step "
                                    f"{step + 1} (lr {sched.get_last_lr()[0]:.3g}); lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(y)
            outcome.step_seconds += time.perf_counter() - t_step
            outcome.steps += 1
            count += len(y)
            bar.set_postfix(loss=f"{total / count:.3f}")
        val = evaluate(model, data.val, backbone.mean, backbone.std)
        outcome.history.append({"epoch": epoch + 1, "train_loss": total / max(1, count), "val_acc": val})
        if progress:
            tqdm.write(f"  {method.name}/{data.name} epoch {epoch + 1}: loss {total / max(1, count):.4f}, val acc {val:.4f}")
        save_checkpoint(ckpt, signature, epoch, outcome.history, stateful)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    finished = len(outcome.history) == schedule.epochs
    if finished and schedule.recalibrate_norms and method.task_norms:
        recalibrate_norms(model, data.train, backbone, schedule.batch_size)
    outcome.seconds = time.perf_counter() - t0
    # back to the standard layout, as merged models have: fold checks then compare the fold,
    # not two conv kernels (channels_last and contiguous convs round differently, ~1e-4)
    model.to(memory_format=torch.contiguous_format).eval()
    return outcome


def sgd(heads: list, body: list, schedule: Schedule) -> torch.optim.SGD:
    """SGD with momentum; the heads (new, randomly initialised) at ``head_lr_scale`` x the lr."""
    groups = [{"params": heads, "lr": schedule.lr * schedule.head_lr_scale}]
    if body:
        groups.append({"params": body, "lr": schedule.lr})
    return torch.optim.SGD(groups, lr=schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay)


def load_checkpoint(ckpt: Path | None, signature: str, stateful: dict) -> dict | None:
    """Restore ``stateful`` (name -> object with ``load_state_dict``) from ``ckpt`` if it exists;
    a checkpoint of another config is refused. Returns the checkpoint (epoch, history) or None."""
    if ckpt is None or not ckpt.is_file():
        return None
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if state.get("signature") != signature:
        raise TrainingError(f"{ckpt}: checkpoint belongs to another config (signature {state.get('signature')!r}, "
                            f"this run {signature!r}); delete it or use another --out")
    for name, obj in stateful.items():
        obj.load_state_dict(state[name])
    return state


def save_checkpoint(ckpt: Path | None, signature: str, epoch: int, history: list, stateful: dict) -> None:
    """Write the state after ``epoch`` atomically (a killed run keeps the previous checkpoint)."""
    if ckpt is None:
        return
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(ckpt) as tmp:
        torch.save({"signature": signature, "epoch": epoch, "history": history}
                   | {name: obj.state_dict() for name, obj in stateful.items()}, tmp)


def recalibrate_norms(model: TaskNet, split: Split, backbone: Backbone, batch_size: int) -> None:
    """Re-estimate BatchNorm running statistics over the whole training split.

    In short schedules the running averages (momentum 0.1) trail the weights; an exact
    population estimate after training is worth up to a few points of accuracy here.
    """
    from torch.optim.swa_utils import update_bn

    update_bn([normalise(x, backbone.mean, backbone.std) for x, _ in split.batches(batch_size)], model)
