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

Parameter groups of another phase (AdaShare's policy) train in their own pass of each epoch
on the other half of every task's train split, with their own optimiser. A method with
several variants gets each trained from scratch; the best mean validation is kept.

Under torchrun every process takes every N-th sample of each task's order (batch size / N)
and the gradients are averaged once per step, after all K tasks' backward passes (one
coalesced all-reduce; ``DistributedDataParallel`` would reduce after each of the K backward
passes, and each forward touches only its task's norms and head).
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

from pipeline.core.backbones import Backbone
from pipeline.data import BadImages, Split, TaskData
from pipeline.methods.base import JointMethod
from pipeline.methods.context import JointContext, Schedule
from pipeline.methods.layers import NORM_TYPES
from pipeline.methods.multitask import MultiTaskNet
from pipeline.training import optim
from pipeline.training.engine import MEMORY_FORMAT, Loop, LoopRecord, TrainingError, bar_off, check_finite
from pipeline.training.evaluate import evaluate, recalibrate_task_norms
from pipeline.training.incremental import global_batch
from pipeline.training.runtime import Runtime


@dataclass
class JointOutcome:
    model: MultiTaskNet
    record: LoopRecord
    candidates: list[dict] = field(default_factory=list)  # every variant's final validation
    unit_seconds: float = 0.0  # ``train_joint`` in all: the method's setup (a search) and every variant

    @property
    def history(self) -> list[dict]:
        return self.record.history

    @property
    def steps(self) -> int:
        return self.record.steps

    @property
    def resumed_from_epoch(self) -> int:
        return self.record.resumed_from_epoch

    @property
    def candidate(self) -> int:
        return self.model.variant

    @property
    def mean_val(self) -> float:
        return self.history[-1]["mean_val_acc"] if self.history else float("-inf")


def train_joint(backbone: Backbone, tasks: dict[str, TaskData], method: JointMethod, schedule: Schedule,
                seed: int, workdir: Path | None = None, signature: str = "", progress: bool = True,
                stop_after_epoch: int | None = None, runtime: Runtime | None = None,
                image_size: int | None = None, log=print) -> JointOutcome:
    """Train ``method`` on all ``tasks``; with several variants, keep the best mean validation."""
    workdir = Path(workdir) if workdir is not None else None
    t0 = time.perf_counter()
    method.setup(joint_context(backbone, tasks, schedule, seed, workdir, signature, progress, runtime, image_size))
    best, seen = None, []
    n = method.variants()
    for i in range(n):
        ckpt = workdir / "scratch" / f"candidate{i}" / "checkpoint.pt" if workdir is not None else None
        out = run_joint(backbone, tasks, method, schedule, seed, ckpt, f"{signature}/candidate{i}", progress,
                        stop_after_epoch, desc=f"{method.name}" + (f" #{i}" if n > 1 else ""), variant=i,
                        runtime=runtime, log=log)
        seen.append({"candidate": i, "mean_val_acc": out.mean_val, "train_seconds": round(out.record.seconds, 2)})
        if best is None or out.mean_val > best.mean_val:
            best = out
    best.candidates = seen
    best.unit_seconds = time.perf_counter() - t0
    return best


def joint_context(backbone: Backbone, tasks: dict[str, TaskData], schedule: Schedule, seed: int,
                  workdir: Path | None = None, signature: str = "", progress: bool = False,
                  runtime: Runtime | None = None, image_size: int | None = None) -> JointContext:
    """The context a joint method is set up with; its ``fit`` is this trainer's ``run_joint``."""
    def fit(m: JointMethod, sched: Schedule, ckpt: Path | None, sig: str, desc: str) -> JointOutcome:
        return run_joint(backbone, tasks, m, sched, seed, ckpt, sig, progress, desc=desc, runtime=runtime)

    if image_size is None:  # the inputs' size, read off one image
        image_size = int(next(iter(tasks.values())).val.dataset[0][0].shape[-1])
    return JointContext(backbone, tasks, image_size, schedule, seed, workdir, signature, progress, fit)


def build_model(backbone: Backbone, tasks: dict[str, TaskData], method: JointMethod, seed: int,
                variant: int = 0) -> MultiTaskNet:
    heads = {t: backbone.new_head(d.num_classes, seed + i) for i, (t, d) in enumerate(tasks.items())}
    model = MultiTaskNet(copy.deepcopy(backbone.features), heads)
    model.variant = variant
    if method.task_norms:
        model.task_norms(NORM_TYPES)
    method.prepare(model, variant)
    return model.to(memory_format=MEMORY_FORMAT)


def _halves(split: Split) -> tuple[Split, Split]:
    """Every other image: the weights' half and the policy's half, same label mix."""
    n = len(split)
    return split.subset(range(0, n, 2)), split.subset(range(1, n, 2))


class JointTrainer:
    """One joint model, its optimisers (one per phase and kind) and its step."""

    def __init__(self, backbone: Backbone, tasks: dict[str, TaskData], method: JointMethod, schedule: Schedule,
                 seed: int, progress: bool = True, desc: str = "joint", variant: int = 0,
                 runtime: Runtime | None = None):
        self.backbone, self.tasks, self.method, self.schedule, self.seed = backbone, tasks, method, schedule, seed
        self.progress, self.desc = progress, desc
        self.runtime = rt = runtime or Runtime()
        torch.manual_seed(seed)
        self.model = build_model(backbone, tasks, method, seed, variant).to(rt.device)
        groups = method.param_groups(self.model)
        phases = {optim.resolve(method, schedule)[g].phase for g, ps in groups.items() if ps}
        self.splits = {"weights": {t: d.train for t, d in tasks.items()}}
        if "policy" in phases:
            halves = {t: _halves(d.train) for t, d in tasks.items()}
            self.splits = {"weights": {t: h[0] for t, h in halves.items()},
                           "policy": {t: h[1] for t, h in halves.items()}}
        self.steps_per_epoch = {ph: math.ceil(max(len(s) for s in sp.values()) / schedule.batch_size)
                                for ph, sp in self.splits.items()}
        self.optimisers = optim.build(method, self.model, schedule, self.steps_per_epoch["weights"])
        self.scaler = rt.scaler()
        self.bad = BadImages(rt.on_bad_image)

    def stateful(self) -> dict:
        return {"model": self.model} | self.optimisers.stateful() | ({"scaler": self.scaler} if self.scaler else {})

    def step(self, batches: dict[str, tuple[torch.Tensor, torch.Tensor]], epoch: int, phase: str) -> float:
        """One optimiser step of ``phase`` over one batch of every task; returns the loss."""
        model, method, rt = self.model, self.method, self.runtime
        self.optimisers.zero_grad(phase)
        step_loss = 0.0
        for t, (x, y) in batches.items():
            x = x.to(rt.device, non_blocking=True).contiguous(memory_format=MEMORY_FORMAT)
            y = y.to(rt.device, non_blocking=True)
            with rt.compute(model):
                loss = method.task_weight(t) * F.cross_entropy(model.use(t)(x), y)
            if not torch.isfinite(loss):
                s = self.schedule
                raise TrainingError(f"{method.name}/{t}: loss is {loss.item()} at epoch {epoch + 1} ({phase} phase, lr "
                                    f"{s.lr:g}, from {s.lr_source}); lower {s.lr_source}")
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            step_loss += loss.item()
        with rt.compute(model):
            reg = method.regulariser(model, epoch)
        if reg is not None and reg.requires_grad:
            if not torch.isfinite(reg):
                raise TrainingError(f"{method.name}: regulariser is {reg.item()} at epoch {epoch + 1}")
            (self.scaler.scale(reg) if self.scaler is not None else reg).backward()
            step_loss += reg.item()
        rt.average_gradients(self.optimisers.params[phase])
        self.optimisers.step(phase, self.scaler)
        return step_loss

    def _streams(self, epoch: int, phase: str) -> dict:
        """Each task's batches for a phase: its own seeded order, cycled (smaller tasks repeat)."""
        rt = self.runtime
        offset = 50 if phase == "policy" else 0  # each task and phase its own stream
        return {t: iter(s.loader(global_batch(self.schedule, rt), seed=self.seed * 7919 + epoch * 101 + i + offset,
                                 rank=rt.rank, world=rt.world, cycles=None))
                for i, (t, s) in enumerate(self.splits[phase].items())}

    def phase(self, epoch: int, phase: str, record: LoopRecord) -> float:
        """One pass of a phase; returns its mean loss."""
        self.method.train_mode(self.model)
        streams = self._streams(epoch, phase)
        steps = self.steps_per_epoch[phase]
        total = 0.0
        for _ in tqdm(range(steps), disable=bar_off(self.progress, self.runtime.main), leave=False,
                      desc=f"{self.desc} {phase} epoch {epoch + 1}/{self.schedule.epochs}"):
            batches = {}
            for t, stream in streams.items():
                b = self.bad.check(next(stream), self.splits[phase][t].dataset.where)
                batches[t] = (b.x, b.y)
            total += record.timed(lambda: self.step(batches, epoch, phase))
        return round(total / max(1, steps), 5)

    def epoch(self, epoch: int, record: LoopRecord) -> dict:
        self.method.start_epoch(self.model, epoch)
        losses = {}
        for phase in self.method.phases(epoch):
            self.optimisers.set_phase(phase)
            losses[phase] = self.phase(epoch, phase, record)
        self.optimisers.set_phase(None)
        s = self.schedule
        check_finite(self.model, f"{self.method.name} (joint)", s.lr, s.lr_source, epoch)
        rec = {"epoch": epoch + 1, "train_loss": losses, **(self.validate() if s.validates(epoch) else {})}
        if self.progress and self.runtime.main:
            tqdm.write(f"  {self.desc} epoch {epoch + 1}: loss {losses}"
                       + (f", mean val acc {rec['mean_val_acc']:.4f}" if "mean_val_acc" in rec else ""))
        return rec

    def validate(self) -> dict:
        val = {t: evaluate(self.model.use(t), d.val, self.runtime) for t, d in self.tasks.items()}
        return {"val_acc": val, "mean_val_acc": mean(val.values())}


def run_joint(backbone: Backbone, tasks: dict[str, TaskData], method: JointMethod, schedule: Schedule, seed: int,
              ckpt: Path | None = None, signature: str = "", progress: bool = True,
              stop_after_epoch: int | None = None, desc: str = "joint", variant: int = 0,
              runtime: Runtime | None = None, log=print) -> JointOutcome:
    """One joint training of one model (``train_joint`` runs one per variant)."""
    trainer = JointTrainer(backbone, tasks, method, schedule, seed, progress, desc, variant, runtime)
    model, rt = trainer.model, trainer.runtime
    loop = Loop(schedule.epochs, seed, trainer.stateful(), ckpt, signature, stop_after_epoch, rt, log)
    record = loop.run(lambda epoch: trainer.epoch(epoch, loop.record))
    if loop.finished and schedule.recalibrate_norms and method.task_statistics:
        t0 = time.perf_counter()
        recalibrate_task_norms(model, {t: d.train_eval for t, d in tasks.items()}, rt, schedule.batch_size)
        check_finite(model, f"{method.name} (joint, BatchNorm re-estimated)", schedule.lr, schedule.lr_source,
                     schedule.epochs - 1)
        record.history[-1].update(trainer.validate())  # what variants are compared on
        record.seconds += time.perf_counter() - t0
    model.to(memory_format=torch.contiguous_format).eval()
    return JointOutcome(model, record)
