"""Optimisers from a method's named parameter groups: one optimiser per (phase, kind), each
group at its own learning rate, and a cosine schedule over the weights phase.

The settings are data (``GroupOptions``: the method's defaults, the head's lr scale from the
``train`` section), so every method trains under the same code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.methods.base import GroupOptions, Method
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
        """Step every optimiser of ``phase`` (through the fp16 ``scaler`` when there is one)."""
        for opt in self.by_phase[phase]:
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


def resolve(method: Method, schedule: Schedule) -> dict[str, GroupOptions]:
    """Every group's options: the method's, else plain SGD at the entry's lr (head: x head_lr_scale)."""
    own = method.group_options()
    return {g: own.get(g) or GroupOptions(lr_scale=schedule.head_lr_scale if g == "head" else 1.0)
            for g in ("head", "norms", "body", "factors", "gates", "policy")}


def build(method: Method, model: nn.Module, schedule: Schedule, steps_per_epoch: int) -> Optimisers:
    groups = method.param_groups(model)
    options = resolve(method, schedule)
    kinds: dict[tuple[str, str], list[dict]] = {}
    out = Optimisers()
    for name, params in groups.items():
        if not params:
            continue
        o = options[name]
        lr = o.lr if o.lr is not None else schedule.lr * o.lr_scale
        kinds.setdefault((o.phase, o.optimizer), []).append({"params": params, "lr": lr, "name": name})
        out.params.setdefault(o.phase, []).extend(params)
    for (phase, kind), param_groups in kinds.items():
        if kind == "sgd":
            opt = torch.optim.SGD(param_groups, lr=schedule.lr, momentum=schedule.momentum,
                                  weight_decay=schedule.weight_decay)
        else:
            opt = torch.optim.Adam(param_groups, lr=param_groups[0]["lr"])
        out.by_phase.setdefault(phase, []).append(opt)
        if phase == "weights":
            out.schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=schedule.epochs * steps_per_epoch))
    return out
