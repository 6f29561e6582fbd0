"""AdaShare (Sun et al., NeurIPS 2020, section 3): per task, execute or skip each residual block.

* **Blocks**: every residual block whose output has its input's shape
  (``pipeline.blocks.skippable_blocks``); the others always run.
* **Policy**: logits ``alpha[k, l] = (execute, skip)`` per task k and block l, equal at start.
  During the search a block's output is ``u_exec * block(x) + u_skip * x`` with ``u`` a soft
  Gumbel-softmax sample at temperature ``tau`` (5, times 0.965 after every policy phase).
* **Losses**: task losses + ``lam_sparsity * sum log p_exec`` (pushes toward skipping) +
  ``lam_sharing * sum_{k1<k2} sum_l (L - l) / L * |p_exec[k1, l] - p_exec[k2, l]|`` with l
  counted 1..L from the input (sharing matters most in the early blocks; the last block has
  weight 0), ``p_exec`` the softmax of the logits.
* **Schedule**: ``warmup_epochs`` with every block executed; then search epochs, each a
  weight phase (SGD) on one half of the train split and a policy phase (Adam) on the other.
  Curriculum: at search epoch j (1-based) only the last ``j * blocks_per_epoch`` blocks are
  free; earlier blocks execute.
* **Retrain**: ``samples`` architectures (the most likely policy, then samples from it) are
  retrained from the pretrained weights with their hard decisions; the best mean validation
  is kept. A skipped block is not run, so the merged model has it removed (``Skip``).

Per task the bundle stores its norms (those of executed blocks), its head and one decision
bit per skippable block; the shared weights are the base.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pipeline.blocks import skippable_blocks
from pipeline.delta import Skip, TaskDelta
from pipeline.methods import register
from pipeline.methods.base import JointConfig, JointContext, JointMethod, head_entry, joint_norm_entries
from pipeline.multitask import MultiTaskNet, TaskSwitch

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


@register
class AdaShare(JointMethod):
    name = "adashare"
    Config = AdaShareConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.stage = "retrain"
        self.search_logits: torch.Tensor | None = None  # (K, L, 2) after the search
        self.search_history: list[dict] = []
        self.policies: list[torch.Tensor] = []  # (K, L) bool execute, one per candidate
        self.selected = 0
        self.blocks: list[str] = []

    @property
    def candidates(self) -> int:
        return len(self.policies) or 1

    def setup(self, context: JointContext) -> None:
        """The policy search (its own joint training, checkpointed in ``scratch/search``), then
        the candidate architectures, so ``train_joint`` retrains each."""
        from pipeline.train_joint import run_joint

        super().setup(context)
        cfg = self.config
        image_size = next(iter(context.tasks.values())).train.images.shape[-1]
        self.blocks = [f"features.{p}" for p in skippable_blocks(context.backbone.features, image_size)]
        if not self.blocks:
            raise ValueError(f"adashare: backbone {context.backbone.name!r} has no skippable block (a residual "
                             f"block whose output has its input's shape)")
        self.stage = "search"
        schedule = dataclasses.replace(context.schedule, epochs=cfg.warmup_epochs + cfg.search_epochs,
                                       recalibrate_norms=False)
        ckpt = context.workdir / "scratch" / "search" / "checkpoint.pt" if context.workdir is not None else None
        out = run_joint(context.backbone, context.tasks, self, schedule, context.seed, ckpt,
                        f"{context.signature}/search", context.progress, desc=f"{self.name} search")
        self.search_logits = torch.stack([b.logits.detach() for _, b in policy_blocks(out.model)], 1)
        self.search_history = out.history
        frozen = len(self.blocks) - free_blocks(cfg, schedule.epochs - 1, len(self.blocks))
        self.policies = self.sample(self.search_logits, cfg.samples, context.seed, always_run=frozen)
        self.stage = "retrain"

    @staticmethod
    def sample(logits: torch.Tensor, n: int, seed: int, always_run: int = 0) -> list[torch.Tensor]:
        """(K, L) execute decisions: the most likely policy, then ``n - 1`` distinct samples from
        it (seeded); fewer when the policy is too certain to give ``n`` distinct ones. The first
        ``always_run`` blocks (never freed by the curriculum) execute in every sample."""
        p = logits.softmax(-1)[..., EXECUTE].clone()
        p[:, :always_run] = 1.0
        out = [p >= 0.5]
        gen = torch.Generator().manual_seed(seed)
        for _ in range(50 * n):
            if len(out) >= n:
                break
            s = torch.rand(p.shape, generator=gen) < p
            if not any(torch.equal(s, o) for o in out):
                out.append(s)
        return out

    def select(self, candidate: int) -> None:
        self.selected = candidate

    def prepare(self, model: MultiTaskNet) -> None:
        super().prepare(model)
        for path in self.blocks:
            model.set_submodule(path, PolicyBlock(model.get_submodule(path), len(model.tasks)))
        if self.stage == "retrain" and self.policies:
            for (_, block), execute in zip(policy_blocks(model), self.policies[self.selected].t()):
                block.mode = "hard"
                block.execute.copy_(execute)
                block.logits.requires_grad_(False)

    def policy_parameters(self, model: MultiTaskNet) -> list[nn.Parameter]:
        return [b.logits for _, b in policy_blocks(model)] if self.stage == "search" else []

    def policy_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.config.policy_lr)

    def phases(self, epoch: int) -> tuple[str, ...]:
        if self.stage == "search" and epoch >= self.config.warmup_epochs:
            return ("weights", "policy")
        return ("weights",)

    def start_epoch(self, model: MultiTaskNet, epoch: int) -> None:
        if self.stage != "search":
            return
        blocks = policy_blocks(model)
        free = free_blocks(self.config, epoch, len(blocks))
        for i, (_, b) in enumerate(blocks):
            b.mode = "soft" if i >= len(blocks) - free else "full"
            b.tau = temperature(self.config, epoch)

    def regulariser(self, model: MultiTaskNet, epoch: int) -> torch.Tensor | None:
        blocks = [b for _, b in policy_blocks(model) if b.mode == "soft"]
        if self.stage != "search" or not blocks:
            return None
        p = torch.stack([b.p_execute() for b in blocks], 1)  # (K, free blocks)
        cfg = self.config
        return cfg.lam_sparsity * sparsity_loss(p) + cfg.lam_sharing * sharing_loss(p)

    def task_delta(self, model: MultiTaskNet, task: str) -> TaskDelta:
        model.use(task)
        k = model.tasks.index(task)
        # the block's tensor names, read off the starting backbone (same architecture as the
        # shared base, and no copy of the model per task)
        base = self.context.backbone.base_net()
        skipped = [p for p, b in policy_blocks(model) if not bool(b.execute[k])]
        entries = {p: Skip.of(base.get_submodule(p)) for p in skipped}
        for path, norm in joint_norm_entries(model).items():
            path = _shared_path(path, self.blocks)
            if not any(path.startswith(f"{s}.") for s in skipped):  # a skipped block's norms are not needed
                entries[path] = norm
        entries |= head_entry(model)
        return TaskDelta(task, self.name, entries, gate_bits=len(policy_blocks(model)))

    def describe(self, model: MultiTaskNet, task: str) -> dict:
        k = model.tasks.index(task)
        blocks = policy_blocks(model)
        out = {"blocks": [p for p, _ in blocks], "executed": [bool(b.execute[k]) for _, b in blocks],
               "candidate": self.selected, "candidates": len(self.policies)}
        if self.search_logits is not None:
            logits = self.search_logits[k]
            out["policy_logits"] = [[round(v, 5) for v in row] for row in logits.tolist()]
            out["p_execute"] = [round(v, 5) for v in logits.softmax(-1)[:, EXECUTE].tolist()]
        return out
