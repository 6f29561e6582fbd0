"""Task specs -> in-memory image tensors, with deterministic domain shifts and splits.

Every task becomes three uint8 tensors (N, 3, S, S) at the backbone's image size plus
labels. Domain shifts of one labelled set (sketch, negative, texture, low resolution)
give DomainNet-style tasks: same labels, different domains. Everything is seeded, so the
same config gives the same pixels, and the prepare stage can be skipped by hash.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.data.config import TaskConfig
from pipeline.data.shifts import SHIFTS
from pipeline.data.sources import DataError, digits, fashion_mnist, image_folder, torchvision_dataset


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        """Yield (uint8 images, labels); shuffled when a generator is given."""
        order = torch.randperm(len(self), generator=generator) if generator is not None else torch.arange(len(self))
        for i in range(0, len(self), batch_size):
            idx = order[i : i + batch_size]
            yield self.images[idx], self.labels[idx]


@dataclass
class TaskData:
    name: str
    num_classes: int
    train: Split
    val: Split
    test: Split

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{s}.{k}": getattr(getattr(self, s), k) for s in ("train", "val", "test") for k in ("images", "labels")}

    @classmethod
    def from_tensors(cls, name: str, num_classes: int, t: dict[str, torch.Tensor]) -> "TaskData":
        return cls(name, num_classes, *(Split(t[f"{s}.images"], t[f"{s}.labels"]) for s in ("train", "val", "test")))


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N,3,H,W) -> float, normalised with the backbone's statistics."""
    x = images.float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def _to_size(x: torch.Tensor, size: int) -> torch.Tensor:
    x = x.float().div(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def _finish(x: torch.Tensor, domain: str, size: int, seed: int, chunk: int = 2048) -> torch.Tensor:
    out = []
    for i in range(0, len(x), chunk):
        y = SHIFTS[domain](_to_size(x[i : i + chunk], size), seed + i)
        out.append(y.mul(255.0).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out) if out else torch.empty(0, 3, size, size, dtype=torch.uint8)


def load_task(task: TaskConfig, image_size: int, seed: int) -> TaskData:
    """Read the task's source, subsample train/val/test deterministically, shift, resize."""
    src = task.source
    try:
        if src.type == "fashion_mnist":
            train, test, k = fashion_mnist(src.root)
        elif src.type == "digits":
            train, test, k = digits(seed)
        elif src.type == "image_folder":
            train, test, k = image_folder(src.root, image_size, seed)
        else:
            train, test, k = torchvision_dataset(src.dataset, src.root)
    except DataError as err:
        raise DataError(f"task {task.name!r}: {err}") from None
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(train[1]), generator=gen)
    if task.val_size >= len(perm):
        raise DataError(f"task {task.name!r}: val_size {task.val_size} leaves no training images (pool {len(perm)})")
    val_idx = perm[: task.val_size]
    train_idx = perm[task.val_size :][: task.train_size]
    test_idx = torch.randperm(len(test[1]), generator=gen)[: task.test_size]
    shift_seed = seed * 1000 + sum(map(ord, task.name))

    def split(pool, idx, offset):
        return Split(_finish(pool[0][idx], task.domain, image_size, shift_seed + offset), pool[1][idx].clone())

    return TaskData(task.name, k, split(train, train_idx, 0), split(train, val_idx, 10**6), split(test, test_idx, 2 * 10**6))
