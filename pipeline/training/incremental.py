"""Incremental training of one (method, task) unit: the method's parameter groups under SGD (or
what the method asks for) with a cosine schedule, on the loop engine, on the unit's device and
precision, data-parallel over the processes of a torchrun (``DistributedDataParallel``; each
process takes every N-th sample of the epoch's order, batch size / N).

``TaskTrainer.step`` is the one training step: ``train_task`` runs it and
``benchmarks/train_step.py`` times it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline.core.backbones import Backbone, TaskNet
from pipeline.data import BadImages, TaskData
from pipeline.methods.base import IncrementalMethod
from pipeline.methods.context import Schedule, TaskContext
from pipeline.training import optim
from pipeline.training.engine import (MEMORY_FORMAT, Loop, LoopRecord, TrainingError, bar_off, check_finite,
                                      epoch_seed)
from pipeline.training.evaluate import evaluate, recalibrate_norms
from pipeline.training.runtime import Runtime


@dataclass
class TrainOutcome:
    model: TaskNet
    record: LoopRecord
    skipped_images: dict[str, str] | None = None  # file -> error, for data.on_bad_image: skip

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
                 signature: str = "", progress: bool = False, versions=None, pool=None,
                 runtime: Runtime | None = None) -> TaskContext:
    """The context an incremental method is set up with; its ``fit`` (another method's training
    run on the same task, CWPS's reference fine-tune) is this trainer's ``train_task``."""
    def fit(method: IncrementalMethod, sched: Schedule, fit_workdir: Path | None, sig: str) -> TrainOutcome:
        return train_task(backbone, data, method, sched, seed, fit_workdir, sig, progress, runtime=runtime)

    return TaskContext(backbone, data, schedule, seed, Path(workdir) if workdir is not None else None, signature,
                       progress, fit, dict(versions or {}), list(pool or []))


def global_batch(schedule: Schedule, runtime: Runtime) -> int:
    """The batch of one step over all processes (each takes an equal share of it)."""
    if schedule.batch_size % runtime.world:
        raise TrainingError(f"train.batch_size {schedule.batch_size} does not split over {runtime.world} processes; "
                            f"use a multiple of {runtime.world}")
    return schedule.batch_size


class TaskTrainer:
    """One unit's model, optimisers and step, built in the order the results depend on (the
    method's setup, the seed, the model, the method's prepare, the optimisers)."""

    def __init__(self, backbone: Backbone, data: TaskData, method: IncrementalMethod, schedule: Schedule, seed: int,
                 workdir: Path | None = None, signature: str = "", progress: bool = True, versions=None, pool=None,
                 runtime: Runtime | None = None):
        self.backbone, self.data, self.method, self.schedule, self.seed = backbone, data, method, schedule, seed
        self.progress = progress
        self.runtime = rt = runtime or Runtime()
        method.setup(task_context(backbone, data, schedule, seed, workdir, signature, progress, versions, pool, rt))
        torch.manual_seed(seed)
        self.model = backbone.task_net(data.num_classes, seed).to(memory_format=MEMORY_FORMAT)
        method.prepare(self.model)
        if rt.sync_bn and rt.distributed:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.to(rt.device)
        self.net = self.model  # what the batches run through: the model, or its DDP wrapper
        if rt.distributed:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[rt.device] if rt.device.type == "cuda" else None,
                find_unused_parameters=False)  # every trainable parameter feeds each forward (a gated-off TAPS
            # delta too: the straight-through gate is 0 forward and passes its gradient backward)
        self.steps_per_epoch = math.ceil(len(data.train) / schedule.batch_size)
        self.optimisers = optim.build(method, self.model, schedule, self.steps_per_epoch)
        self.scaler = rt.scaler()
        self.bad = BadImages(rt.on_bad_image)

    def stateful(self) -> dict:
        return {"model": self.model} | self.optimisers.stateful() | ({"scaler": self.scaler} if self.scaler else {})

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> float:
        """One optimiser step on a batch of inputs (any device; moved to the unit's); returns the loss."""
        rt, method = self.runtime, self.method
        x = x.to(rt.device, non_blocking=True).contiguous(memory_format=MEMORY_FORMAT)
        y = y.to(rt.device, non_blocking=True)
        with rt.compute(self.model):
            loss = F.cross_entropy(self.net(x), y)
            reg = method.regulariser(self.model, epoch)
            if reg is not None:
                loss = loss + reg
        if not torch.isfinite(loss):
            s = self.schedule
            trained = {g for g, ps in method.param_groups(self.model).items() if ps}
            raise TrainingError(f"{method.name}/{self.data.name}: loss is {loss.item()} at epoch {epoch + 1} (lr "
                                f"{s.lr:g}, from {s.lr_source}; per group {optim.lr_summary(method, s, trained)}); "
                                f"lower {s.lr_source}, or a group's lr under the entry's optim")
        self.optimisers.zero_grad("weights")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.optimisers.step("weights", self.scaler)
        else:
            loss.backward()
            self.optimisers.step("weights")
        return loss.item()

    def epoch(self, epoch: int, record: LoopRecord) -> dict:
        method, data, schedule, rt = self.method, self.data, self.schedule, self.runtime
        method.start_epoch(self.model, epoch)
        method.train_mode(self.model)
        loader = data.train.loader(global_batch(schedule, rt), seed=epoch_seed(self.seed, epoch), rank=rt.rank,
                                   world=rt.world)
        total = torch.zeros(2, dtype=torch.float64)
        bar = tqdm(loader, total=self.steps_per_epoch, disable=bar_off(self.progress, rt.main), leave=False,
                   desc=f"{method.name}/{data.name} epoch {epoch + 1}/{schedule.epochs}")
        for batch in bar:
            self.bad.check(batch, data.train.dataset.where)
            if not len(batch.y):
                continue
            loss = record.timed(lambda: self.step(batch.x, batch.y, epoch))
            total += torch.tensor([loss * len(batch.y), len(batch.y)], dtype=torch.float64)
            bar.set_postfix(loss=f"{total[0] / total[1]:.3f}")
        rt.all_sum(total)
        check_finite(self.model, f"{method.name}/{data.name}", schedule.lr, schedule.lr_source, epoch)
        mean_loss = float(total[0] / total[1].clamp_min(1))
        row = {"epoch": epoch + 1, "train_loss": mean_loss}
        if schedule.validates(epoch):
            row["val_acc"] = evaluate(self.model, data.val, rt)
        if self.progress and rt.main:
            tqdm.write(f"  {method.name}/{data.name} epoch {epoch + 1}: loss {mean_loss:.4f}"
                       + (f", val acc {row['val_acc']:.4f}" if "val_acc" in row else ""))
        return row


def train_task(backbone: Backbone, data: TaskData, method: IncrementalMethod, schedule: Schedule, seed: int,
               workdir: Path | None = None, signature: str = "", progress: bool = True,
               stop_after_epoch: int | None = None, versions=None, pool=None,
               runtime: Runtime | None = None, log: Callable[[str], None] = print) -> TrainOutcome:
    """Train ``method`` on ``data``; checkpoint to ``workdir/checkpoint.pt`` after every epoch.

    ``signature`` identifies the run (config hash); ``stop_after_epoch`` ends early (tests of
    resume). ``versions``/``pool``: earlier units' deltas, for methods that borrow from them.
    """
    trainer = TaskTrainer(backbone, data, method, schedule, seed, workdir, signature, progress, versions, pool,
                          runtime)
    model, rt = trainer.model, trainer.runtime
    ckpt = Path(workdir) / "checkpoint.pt" if workdir is not None else None
    loop = Loop(schedule.epochs, seed, trainer.stateful(), ckpt, signature, stop_after_epoch, rt, log)
    record = loop.run(lambda epoch: trainer.epoch(epoch, loop.record))
    if loop.finished and schedule.recalibrate_norms and method.task_statistics:
        t0 = time.perf_counter()
        recalibrate_norms(model, data.train_eval, rt, schedule.batch_size)
        check_finite(model, f"{method.name}/{data.name} (BatchNorm re-estimated)", schedule.lr, schedule.lr_source,
                     schedule.epochs - 1)
        record.seconds += time.perf_counter() - t0
    # back to the standard layout, as merged models have: fold checks then compare the fold,
    # not two conv kernels (channels_last and contiguous convs round differently, ~1e-4)
    model.to(memory_format=torch.contiguous_format).eval()
    return TrainOutcome(model, record, dict(trainer.bad.skipped))
