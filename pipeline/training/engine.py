"""The loop every trainer runs: epochs seeded from (seed, epoch), a checkpoint after each,
resume from the last one, and the history of what each epoch measured.

Determinism: every random op of an epoch is seeded from (seed, epoch), and model, optimiser
and schedule state are checkpointed, so a run killed and resumed gives the same weights as one
that never stopped. A checkpoint written for another config (its ``signature``) is refused
rather than silently mixed in.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pipeline.core.errors import TaskfoldError
from pipeline.core.io import atomic_path
from pipeline.training.runtime import Runtime

# NHWC is ~15% faster per CPU training step for EfficientNet-Lite0's depthwise convs
# (456 -> 387 ms fine-tune, 464 -> 401 ms TAPS at batch 64, 64 px, 2 threads)
MEMORY_FORMAT = torch.channels_last


class TrainingError(TaskfoldError, RuntimeError):
    """Training cannot go on (NaN loss, a checkpoint from another run); says where."""


def bar_off(progress: bool, main: bool) -> bool | None:
    """tqdm's ``disable`` for a step bar: off when asked or on other ranks, and otherwise left to
    tqdm, which draws it only on a terminal. Redirected to a file, a bar is a line per step
    (300 KB of the quickstart's log); the per-epoch lines say what a log needs."""
    return None if progress and main else True


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 7919 + epoch


@dataclass
class LoopRecord:
    """What a loop did in this call: history of every epoch (resumed ones included) and timing."""

    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # wall time of this call: steps, validation
    steps: int = 0  # optimiser steps taken in this call
    step_seconds: float = 0.0  # time inside those steps only (forward, backward, update)
    resumed_from_epoch: int = 0

    def timed(self, fn: Callable[[], float]) -> float:
        """Run one optimiser step and count it."""
        t0 = time.perf_counter()
        out = fn()
        self.step_seconds += time.perf_counter() - t0
        self.steps += 1
        return out


class Loop:
    """``run(epoch_fn)`` calls ``epoch_fn(epoch)`` for every epoch not yet in the checkpoint,
    appends what it returns to the history and checkpoints ``stateful`` (name -> object with
    ``state_dict``/``load_state_dict``) after each."""

    def __init__(self, epochs: int, seed: int, stateful: dict, ckpt: Path | None = None, signature: str = "",
                 stop_after_epoch: int | None = None, runtime: Runtime | None = None,
                 log: Callable[[str], None] = print):
        self.runtime = runtime or Runtime()
        self.log = log
        self.epochs = epochs
        self.seed = seed
        self.stateful = stateful
        self.ckpt = ckpt
        self.signature = signature
        self.stop_after_epoch = stop_after_epoch
        self.record = LoopRecord()

    def run(self, epoch_fn: Callable[[int], dict]) -> LoopRecord:
        rec = self.record
        start = 0
        if (state := load_checkpoint(self.ckpt, self.signature, self.stateful, self.log)) is not None:
            rec.history = state["history"]
            start = rec.resumed_from_epoch = state["epoch"] + 1
        t0 = time.perf_counter()
        for epoch in range(start, self.epochs):
            torch.manual_seed(epoch_seed(self.seed, epoch))
            random.seed(epoch_seed(self.seed, epoch))
            rec.history.append(epoch_fn(epoch))
            if self.runtime.main:  # every process holds the same state; one writes it
                save_checkpoint(self.ckpt, self.signature, epoch, rec.history, self.stateful)
            self.runtime.barrier()
            if self.stop_after_epoch is not None and epoch + 1 >= self.stop_after_epoch:
                break
        rec.seconds = time.perf_counter() - t0
        return rec

    @property
    def finished(self) -> bool:
        return len(self.record.history) == self.epochs


def load_checkpoint(ckpt: Path | None, signature: str, stateful: dict, log: Callable[[str], None] = print) -> dict | None:
    """Restore ``stateful`` from ``ckpt`` if it holds this run's state. A checkpoint of another
    config (the unit's settings changed since), of an older taskfold, or unreadable (cut short
    by a full disk) is a cache that no longer applies: it is removed, with a line saying why,
    and the unit starts afresh. Returns the checkpoint (epoch, history) or None."""
    if ckpt is None or not ckpt.is_file():
        return None
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        why = None if isinstance(state, dict) and state.get("signature") == signature else "another config"
        if why is None and (missing := [k for k in stateful if k not in state]):
            why = f"an older taskfold (no {missing[0]!r})"
        if why is None:
            for name, obj in stateful.items():
                obj.load_state_dict(state[name])
            return state
    except Exception as err:  # noqa: BLE001  (torch.load raises several types for a broken file)
        why = f"unreadable ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    log(f"  {ckpt}: checkpoint of {why}; removed, the unit starts from epoch 1")
    ckpt.unlink(missing_ok=True)
    return None


def check_finite(model: torch.nn.Module, where: str, lr: float, lr_source: str, epoch: int) -> None:
    """Stop at the first parameter or statistic that is not finite (a diverged model is never saved)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise TrainingError(f"{where}: {name} is not finite after epoch {epoch + 1} (lr {lr:g}, from {lr_source}); "
                                f"the model diverged: lower {lr_source}")


def save_checkpoint(ckpt: Path | None, signature: str, epoch: int, history: list, stateful: dict) -> None:
    """Write the state after ``epoch`` atomically (a killed run keeps the previous checkpoint)."""
    if ckpt is None:
        return
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(ckpt) as tmp:
        torch.save({"signature": signature, "epoch": epoch, "history": history}
                   | {name: obj.state_dict() for name, obj in stateful.items()}, tmp)
