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

import torch

from pipeline.core.blocks import skippable_blocks
from pipeline.core.delta import Skip, TaskDelta
from pipeline.methods.adashare.policy import (EXECUTE, AdaShareConfig, PolicyBlock, _shared_path, free_blocks,
                                              policy_blocks, sharing_loss, sparsity_loss, temperature)
from pipeline.methods.base import Facts, GroupOptions, JointMethod
from pipeline.methods.context import JointContext
from pipeline.methods.layers import head_entry, joint_norm_entries
from pipeline.methods.multitask import MultiTaskNet


class AdaShareFacts(Facts):
    blocks: list[str]
    executed: list[bool]
    candidate: int  # the architecture kept, among those retrained
    candidates: int
    policy_logits: list[list[float]] | None = None  # after the search, (blocks, [execute, skip])
    p_execute: list[float] | None = None


class AdaShare(JointMethod):
    name = "adashare"
    Config = AdaShareConfig
    Facts = AdaShareFacts

    def __init__(self, config=None):
        super().__init__(config)
        self.stage = "retrain"
        self.search_logits: torch.Tensor | None = None  # (K, L, 2) after the search
        self.search_history: list[dict] = []
        self.policies: list[torch.Tensor] = []  # (K, L) bool execute, one per architecture retrained
        self.blocks: list[str] = []

    def variants(self) -> int:
        return len(self.policies) or 1

    def setup(self, context: JointContext) -> None:
        """The policy search (its own joint training, checkpointed in ``scratch/search``), then
        the architectures sampled from it, each of which the trainer retrains (``variants``)."""
        super().setup(context)
        cfg = self.config
        self.blocks = [f"features.{p}" for p in skippable_blocks(context.backbone.features, context.image_size)]
        if not self.blocks:
            raise ValueError(f"adashare: backbone {context.backbone.name!r} has no skippable block (a residual "
                             f"block whose output has its input's shape)")
        self.stage = "search"
        schedule = dataclasses.replace(context.schedule, epochs=cfg.warmup_epochs + cfg.search_epochs,
                                       recalibrate_norms=False)
        ckpt = context.workdir / "scratch" / "search" / "checkpoint.pt" if context.workdir is not None else None
        out = context.fit(self, schedule, ckpt, f"{context.signature}/search", f"{self.name} search")
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

    def prepare(self, model: MultiTaskNet, variant: int = 0) -> None:
        super().prepare(model, variant)
        for path in self.blocks:
            model.set_submodule(path, PolicyBlock(model.get_submodule(path), len(model.tasks)))
        if self.stage == "retrain" and self.policies:
            for (_, block), execute in zip(policy_blocks(model), self.policies[variant].t()):
                block.mode = "hard"
                block.execute.copy_(execute)
                block.logits.requires_grad_(False)

    def group_of(self, name: str) -> str:
        return "policy" if name.endswith(".logits") else "body"

    def group_options(self) -> dict[str, GroupOptions]:
        return {"policy": GroupOptions(optimizer="adam", lr=self.config.policy_lr, weight_decay=0.0, phase="policy")}

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

    def describe(self, model: MultiTaskNet, task: str) -> AdaShareFacts:
        k = model.tasks.index(task)
        blocks = policy_blocks(model)
        out = AdaShareFacts(blocks=[p for p, _ in blocks], executed=[bool(b.execute[k]) for _, b in blocks],
                            candidate=model.variant, candidates=len(self.policies))
        if self.search_logits is not None:
            logits = self.search_logits[k]
            out.policy_logits = [[round(v, 5) for v in row] for row in logits.tolist()]
            out.p_execute = [round(v, 5) for v in logits.softmax(-1)[:, EXECUTE].tolist()]
        return out

    @classmethod
    def summarise(cls, entry: dict) -> dict:
        from pipeline.methods.adashare.report import correlation

        corr = correlation(cls.facts(entry))
        return {"policy_correlation": {"tasks": corr[0], "cosine": corr[1]}} if corr else {}

    @classmethod
    def report(cls, label, entry, plot_dir):
        from pipeline.methods.adashare.report import policy_section

        return policy_section(cls.facts(entry), label, entry, plot_dir)
