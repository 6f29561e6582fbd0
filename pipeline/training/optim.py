"""Optimisers from a method's named parameter groups: one optimiser per (phase, kind), each
group at its own learning rate, and a cosine schedule over the weights phase.

The settings are data (``GroupOptions``: the method's defaults, the head's lr scale from the
``train`` section), so every method trains under the same code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.methods.base import GROUPS, GroupOptions, Method
from pipeline.methods.context import Schedule


@dataclass
class Optimisers:
    """Every optimiser of a model by phase, the parameters each phase trains, and the schedules."""

    by_phase: dict[str, list[torch.optim.Optimizer]] = field(default_factory=dict)
    params: dict[str, list[nn.Parameter]] = field(default_factory=dict)
    schedulers: list = field(default_factory=list)

    def zero_grad(self, phase: str) -> None:
        for opt in self.by_phase[phase]:
            opt.zero_grad(set_to_none=True)

    def step(self, phase: str, scaler=None) -> None:
        """Step every optimiser of ``phase`` (through the fp16 ``scaler`` when there is one), each
        group's gradient norm clipped first where it asks for it."""
        for opt in self.by_phase[phase]:
            clipped = [g for g in opt.param_groups if g.get("clip")]
            if clipped and scaler is not None:
                scaler.unscale_(opt)
            for g in clipped:
                torch.nn.utils.clip_grad_norm_([p for p in g["params"] if p.grad is not None], g["clip"])
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
        if scaler is not None:
            scaler.update()
        if phase == "weights":
            for sched in self.schedulers:
                sched.step()

    def lr(self) -> float:
        """The current lr of the weights phase's last group (the body, or the head alone)."""
        return self.by_phase["weights"][0].param_groups[-1]["lr"] if self.by_phase.get("weights") else 0.0

    def stateful(self) -> dict:
        """name -> object with state_dict, for checkpoints."""
        out = {f"optimizer.{phase}.{i}": opt for phase, opts in self.by_phase.items() for i, opt in enumerate(opts)}
        return out | {f"scheduler.{i}": s for i, s in enumerate(self.schedulers)}

    def set_phase(self, phase: str | None) -> None:
        """Only ``phase``'s parameters take gradients (None: all of them again)."""
        for ph, params in self.params.items():
            for p in params:
                p.requires_grad_(phase is None or ph == phase)


# The head starts from random and sees the most signal: Adam at 3e-3 trains it in the few
# hundred steps of a short schedule without the SGD lr x head_lr_scale guess (quickstart, mean of
# 4 tasks: fine-tune 0.802 -> 0.8125, CWPS 0.781 -> 0.793, FTN needs it: SGD heads drown the
# adapters' gradients). ``train.optim: {head: {optimizer: sgd}}`` restores the papers' SGD head.
HEAD = GroupOptions(optimizer="adam", lr=3e-3)


def resolve(method: Method, schedule: Schedule) -> dict[str, GroupOptions]:
    """Every group's options, each layer over the one before: plain SGD at the entry's lr from the
    ``train`` section (the head: Adam, ``HEAD``), the method's defaults, ``train.optim``, the
    entry's ``optim``."""
    own = method.group_options()
    out = {}
    for g in GROUPS:
        base = GroupOptions(optimizer="sgd", lr_scale=schedule.head_lr_scale if g == "head" else 1.0,
                            momentum=schedule.momentum, weight_decay=schedule.weight_decay, warmup_epochs=0.0,
                            phase="weights")
        if g == "head":
            base = base.over(HEAD)
        out[g] = base.over(own.get(g)).over(schedule.run_groups.get(g)).over(schedule.groups.get(g))
    return out


def group_lr(o: GroupOptions, schedule: Schedule) -> float:
    """A resolved group's lr: its own, else its scale x the entry's lr."""
    return o.lr if o.lr is not None else schedule.lr * o.lr_scale


def lr_summary(method: Method, schedule: Schedule, groups: set[str]) -> str:
    """The lr and optimiser each of ``groups`` trains with, for messages (``body: sgd 0.01``)."""
    out = []
    for g, o in resolve(method, schedule).items():
        if g in groups:
            out.append(f"{g}: {o.optimizer} {group_lr(o, schedule):g}")
    return ", ".join(out)


def factor(step: int, total: int, warmup: int) -> float:
    """The lr multiplier at ``step``: a linear ramp over ``warmup`` steps, times a cosine decay
    from 1 to 0 over the ``total`` steps."""
    ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return ramp * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))


def build(method: Method, model: nn.Module, schedule: Schedule, steps_per_epoch: int) -> Optimisers:
    groups = method.param_groups(model)
    options = resolve(method, schedule)
    kinds: dict[tuple[str, str], list[dict]] = {}
    out = Optimisers()
    for name, params in groups.items():
        if not params:
            continue
        o = options[name]
        group = {"params": params, "lr": group_lr(o, schedule), "name": name, "weight_decay": o.weight_decay, "clip": o.clip,
                 "warmup_steps": int(round(o.warmup_epochs * steps_per_epoch))}
        if o.optimizer == "sgd":
            group["momentum"] = o.momentum
        kinds.setdefault((o.phase, o.optimizer), []).append(group)
        out.params.setdefault(o.phase, []).extend(params)
    total = schedule.epochs * steps_per_epoch
    for (phase, kind), param_groups in kinds.items():
        if kind == "sgd":
            opt = torch.optim.SGD(param_groups, lr=param_groups[0]["lr"])
        elif kind == "adam":
            opt = torch.optim.Adam(param_groups, lr=param_groups[0]["lr"])
        else:
            opt = torch.optim.AdamW(param_groups, lr=param_groups[0]["lr"])
        out.by_phase.setdefault(phase, []).append(opt)
        if phase == "weights":
            lambdas = [lambda step, w=g["warmup_steps"]: factor(step, total, w) for g in param_groups]
            out.schedulers.append(torch.optim.lr_scheduler.LambdaLR(opt, lambdas))
    return out
