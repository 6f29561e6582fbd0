"""Incremental training of one (method, task) unit: the method's parameter groups under
SGD (or what the method asks for) with a cosine schedule, on the loop engine.

``TaskTrainer.step`` is the one training step: ``train_task`` runs it and
``benchmarks/train_step.py`` times it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline.core.backbones import Backbone, TaskNet
from pipeline.data import TaskData, normalise
from pipeline.methods.base import IncrementalMethod
from pipeline.methods.context import Schedule, TaskContext
from pipeline.training import optim
from pipeline.training.engine import MEMORY_FORMAT, Loop, LoopRecord, TrainingError, epoch_seed
from pipeline.training.evaluate import evaluate, recalibrate_norms


@dataclass
class TrainOutcome:
    model: TaskNet
    record: LoopRecord

    @property
    def history(self) -> list[dict]:
        return self.record.history

    @property
    def steps(self) -> int:
        return self.record.steps

    @property
    def resumed_from_epoch(self) -> int:
        return self.record.resumed_from_epoch


def task_context(backbone: Backbone, data: TaskData, schedule: Schedule, seed: int, workdir: Path | None = None,
                 signature: str = "", progress: bool = False, versions=None, pool=None) -> TaskContext:
    """The context an incremental method is set up with; its ``fit`` (another method's training
    run on the same task, CWPS's reference fine-tune) is this trainer's ``train_task``."""
    def fit(method: IncrementalMethod, sched: Schedule, fit_workdir: Path | None, sig: str) -> TrainOutcome:
        return train_task(backbone, data, method, sched, seed, fit_workdir, sig, progress)

    return TaskContext(backbone, data, schedule, seed, Path(workdir) if workdir is not None else None, signature,
                       progress, fit, dict(versions or {}), list(pool or []))


class TaskTrainer:
    """One unit's model, optimisers and step, built in the order the results depend on (the
    method's setup, the seed, the model, the method's prepare, the optimisers)."""

    def __init__(self, backbone: Backbone, data: TaskData, method: IncrementalMethod, schedule: Schedule, seed: int,
                 workdir: Path | None = None, signature: str = "", progress: bool = True, versions=None, pool=None):
        self.backbone, self.data, self.method, self.schedule, self.seed = backbone, data, method, schedule, seed
        self.progress = progress
        method.setup(task_context(backbone, data, schedule, seed, workdir, signature, progress, versions, pool))
        torch.manual_seed(seed)
        self.model = backbone.task_net(data.num_classes, seed).to(memory_format=MEMORY_FORMAT)
        method.prepare(self.model)
        self.steps_per_epoch = math.ceil(len(data.train) / schedule.batch_size)
        self.optimisers = optim.build(method, self.model, schedule, self.steps_per_epoch)

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> float:
        """One optimiser step on a uint8 batch; returns the loss."""
        model, method = self.model, self.method
        logits = model(normalise(x, self.backbone.mean, self.backbone.std).contiguous(memory_format=MEMORY_FORMAT))
        loss = F.cross_entropy(logits, y)
        reg = method.regulariser(model, epoch)
        if reg is not None:
            loss = loss + reg
        if not torch.isfinite(loss):
            raise TrainingError(f"{method.name}/{self.data.name}: loss is {loss.item()} at epoch {epoch + 1} "
                                f"(lr {self.optimisers.lr():.3g}); lower the lr")
        self.optimisers.zero_grad("weights")
        loss.backward()
        self.optimisers.step("weights")
        return loss.item()

    def epoch(self, epoch: int, record: LoopRecord) -> dict:
        method, data, schedule = self.method, self.data, self.schedule
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        method.start_epoch(self.model, epoch)
        method.train_mode(self.model)
        total, count = 0.0, 0
        bar = tqdm(data.train.batches(schedule.batch_size, gen), total=self.steps_per_epoch, disable=not self.progress,
                   desc=f"{method.name}/{data.name} epoch {epoch + 1}/{schedule.epochs}", leave=False)
        for x, y in bar:
            total += record.timed(lambda: self.step(x, y, epoch)) * len(y)
            count += len(y)
            bar.set_postfix(loss=f"{total / count:.3f}")
        val = evaluate(self.model, data.val, self.backbone.mean, self.backbone.std)
        if self.progress:
            tqdm.write(f"  {method.name}/{data.name} epoch {epoch + 1}: loss {total / max(1, count):.4f}, val acc {val:.4f}")
        return {"epoch": epoch + 1, "train_loss": total / max(1, count), "val_acc": val}


def train_task(backbone: Backbone, data: TaskData, method: IncrementalMethod, schedule: Schedule, seed: int,
               workdir: Path | None = None, signature: str = "", progress: bool = True,
               stop_after_epoch: int | None = None, versions=None, pool=None) -> TrainOutcome:
    """Train ``method`` on ``data``; checkpoint to ``workdir/checkpoint.pt`` after every epoch.

    ``signature`` identifies the run (config hash); ``stop_after_epoch`` ends early (tests of
    resume). ``versions``/``pool``: earlier units' deltas, for methods that borrow from them.
    """
    trainer = TaskTrainer(backbone, data, method, schedule, seed, workdir, signature, progress, versions, pool)
    model = trainer.model
    ckpt = Path(workdir) / "checkpoint.pt" if workdir is not None else None
    loop = Loop(schedule.epochs, seed, {"model": model} | trainer.optimisers.stateful(), ckpt, signature,
                stop_after_epoch)
    record = loop.run(lambda epoch: trainer.epoch(epoch, loop.record))
    if loop.finished and schedule.recalibrate_norms and method.task_norms:
        t0 = time.perf_counter()
        recalibrate_norms(model, data.train, backbone.mean, backbone.std, schedule.batch_size)
        record.seconds += time.perf_counter() - t0
    # back to the standard layout, as merged models have: fold checks then compare the fold,
    # not two conv kernels (channels_last and contiguous convs round differently, ~1e-4)
    model.to(memory_format=torch.contiguous_format).eval()
    return TrainOutcome(model, record)
