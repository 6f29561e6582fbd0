"""AdaShare's select-or-skip policy: the per-task block wrapper, its schedule (temperature,
curriculum) and its two losses (sparsity, sharing)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pipeline.methods.base import JointConfig
from pipeline.methods.multitask import MultiTaskNet, TaskSwitch

EXECUTE, SKIP = 0, 1


class AdaShareConfig(JointConfig):
    warmup_epochs: int = Field(1, ge=0, description="epochs with every block executed before the policy trains")
    search_epochs: int = Field(3, ge=1, description="epochs of alternating weight and policy phases")
    blocks_per_epoch: int | None = Field(None, ge=1, description="curriculum: blocks freed per search epoch "
                                         "(the paper: 1; default: all blocks free by the last search epoch)")
    temperature: float = Field(5.0, gt=0, description="initial Gumbel-softmax temperature")
    temperature_decay: float = Field(0.965, gt=0, le=1, description="factor after every policy phase")
    # 0.1, not the reference's 0.01: a search here is tens of policy steps, not thousands, and Adam
    # moves a logit by about lr per step (at 0.01, p(execute) could go from 0.5 to 0.56 at most)
    policy_lr: float = Field(0.1, gt=0, description="Adam learning rate of the policy logits")
    # 0.05 made every task skip every block on the quickstart's tasks; 0.01 leaves the early ones
    lam_sparsity: float = Field(0.01, ge=0, description="weight of sum log p_execute (the paper's lambda_sp)")
    lam_sharing: float = Field(0.05, ge=0, description="weight of the depth-weighted policy difference (lambda_sh)")
    samples: int = Field(2, ge=1, description="architectures retrained from the learned policy; best val kept")


class PolicyBlock(nn.Module, TaskSwitch):
    """A skippable block under a per-task policy.

    Modes: ``full`` (always execute: warm-up, and blocks the curriculum has not freed),
    ``soft`` (Gumbel-softmax mixture in training, the most likely decision in eval), ``hard``
    (a fixed decision per task: the retrained architectures)."""

    def __init__(self, block: nn.Module, num_tasks: int):
        super().__init__()
        self.block = block
        self.logits = nn.Parameter(torch.zeros(num_tasks, 2))
        self.register_buffer("execute", torch.ones(num_tasks, dtype=torch.bool))
        self.mode = "full"
        self.tau = 1.0

    def p_execute(self) -> torch.Tensor:
        return self.logits.softmax(-1)[:, EXECUTE]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "full":
            return self.block(x)
        if self.mode == "hard" or not self.training:
            run = bool(self.execute[self.active]) if self.mode == "hard" else bool(self.p_execute()[self.active] >= 0.5)
            return self.block(x) if run else x
        u = F.gumbel_softmax(self.logits[self.active], tau=self.tau, hard=False)
        return u[EXECUTE] * self.block(x) + u[SKIP] * x

    def shared(self) -> nn.Module:
        return self.block


def policy_blocks(model: MultiTaskNet) -> list[tuple[str, PolicyBlock]]:
    return model.switches(PolicyBlock)


def temperature(cfg: AdaShareConfig, epoch: int) -> float:
    """The Gumbel temperature during ``epoch``: decayed once per policy phase before it."""
    return cfg.temperature * cfg.temperature_decay ** max(0, epoch - cfg.warmup_epochs)


def free_blocks(cfg: AdaShareConfig, epoch: int, num_blocks: int) -> int:
    """How many of the last blocks the curriculum lets the policy decide during ``epoch``."""
    if epoch < cfg.warmup_epochs:
        return 0
    per_epoch = cfg.blocks_per_epoch or math.ceil(num_blocks / cfg.search_epochs)
    return min(num_blocks, (epoch - cfg.warmup_epochs + 1) * per_epoch)


def sparsity_loss(p_execute: torch.Tensor) -> torch.Tensor:
    """``sum log p_exec`` over tasks and blocks: lower when more blocks are skipped."""
    return torch.log(p_execute.clamp_min(1e-8)).sum()


def sharing_loss(p_execute: torch.Tensor) -> torch.Tensor:
    """``sum_{k1<k2} sum_l (L - l)/L |p[k1, l] - p[k2, l]|`` for ``p_execute`` of shape (K, L),
    l = 1..L: zero when the tasks' policies agree, early blocks weigh most."""
    k, num_blocks = p_execute.shape
    weight = (num_blocks - torch.arange(1, num_blocks + 1, dtype=p_execute.dtype)) / num_blocks
    i, j = torch.triu_indices(k, k, offset=1)
    return ((p_execute[i] - p_execute[j]).abs() * weight).sum()


def _shared_path(path: str, blocks: list[str]) -> str:
    """A path inside a ``PolicyBlock`` as the shared base has it (the plain block in its place)."""
    for b in blocks:
        if path.startswith(f"{b}.block."):
            return f"{b}." + path[len(f"{b}.block."):]
    return path
