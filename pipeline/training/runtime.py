"""Where and how a training unit runs: the device, the precision, and the process group.

* ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``; under torchrun
  each process takes ``cuda:LOCAL_RANK``.
* ``precision``: ``fp32``, ``bf16`` or ``fp16`` through ``torch.autocast`` (CPU bf16 too); fp16
  with a ``GradScaler``. Weights, optimiser state, deltas and checkpoints stay float32;
  evaluation and fold checks run in float32, as the exported models do.
* several processes (``torchrun``: RANK, WORLD_SIZE, LOCAL_RANK): gloo on CPU, nccl on GPUs;
  rank 0 writes, every rank reads the same checkpoints.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.core.errors import TaskfoldError
from pipeline.training.depthwise import depthwise_kernels, trains_depthwise

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(TaskfoldError, RuntimeError):
    """A device or process group that cannot be used here; names the config field."""


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``run.device`` -> a torch device that exists on this machine."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if not spec.startswith("cuda"):
        raise DeviceError(f"run.device: {spec!r} is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"run.device: {spec!r} asked for, but torch sees no CUDA GPU here "
                          f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use cpu or auto")
    index = local_rank if spec == "cuda" else int(spec.split(":", 1)[1])
    if index >= torch.cuda.device_count():
        raise DeviceError(f"run.device: {spec!r} (process {local_rank}) but this machine has "
                          f"{torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


@dataclass
class Runtime:
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    rank: int = 0
    world: int = 1
    workers: int = 0  # DataLoader workers for sources that decode files
    on_bad_image: str = "error"
    sync_bn: bool = False
    depthwise_kernels: bool = True  # False: PyTorch's own CPU kernels only (benchmarks/train_step.py compares)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """The process that writes files."""
        return self.rank == 0

    def compute(self, model: torch.nn.Module):
        """The context a training forward of ``model`` runs in: autocast for the precision; in
        float32 on a CPU, with depthwise weights to train, taskfold's depthwise kernels
        (``pipeline.training.depthwise``)."""
        dtype = PRECISIONS[self.precision]
        if dtype is not None:
            return torch.autocast(self.device.type, dtype=dtype)
        if self.device.type == "cpu" and self.depthwise_kernels and trains_depthwise(model):
            return depthwise_kernels()
        return contextlib.nullcontext()

    def scaler(self):
        """A GradScaler for fp16 (float16 gradients underflow without one), else None."""
        if self.precision != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over every process (in place; returned)."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Every rank's gradients replaced by their mean (a parameter no rank touched stays None;
        one that some ranks touched counts zeros for the others), coalesced into one all-reduce."""
        if not self.distributed:
            return
        used = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.device)
        self.all_sum(used)
        grads = []
        for p, n in zip(params, used.tolist()):
            if n:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            self.all_sum(flat).div_(self.world)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(device: torch.device, world: int) -> None:
    """Join the process group torchrun set up (once per process)."""
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
