"""A task's splits as ``torch.utils.data`` datasets read lazily, and the loaders over them.

Memory does not grow with the data set: a split holds its index (items and labels) and a
reader; images are decoded in ``__getitem__`` (in DataLoader workers when there are files to
decode). Order and augmentation are seeded per sample: the sampler yields ``(index, seed)``,
so an epoch's batches, and every random crop in them, are the same whatever the number of
workers or ranks (rank r of N takes every N-th sample of the epoch's order, so the union of
the ranks' batches is the single-process batch).

A sample that cannot be decoded becomes a ``BadSample`` naming the file; the collate step
drops it and the caller decides (``data.on_bad_image``): stop with its path, or count it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.data.errors import DataError
from pipeline.data.transforms import ToInput


@dataclass
class BadSample:
    where: str  # the file (or source item) that failed
    error: str


class TaskDataset(Dataset):
    def __init__(self, items: Sequence, labels: Sequence[int], reader, transform: ToInput, shift_seed: int = 0,
                 where: str = ""):
        self.items, self.labels, self.reader, self.transform = list(items), list(labels), reader, transform
        self.shift_seed = shift_seed
        self.where = where  # "task 'x', split 'train'"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list:
        """Samples for a batch of keys (``index`` or ``(index, augmentation seed)``); DataLoader
        fetches whole batches through this, so non-random transforms run batched."""
        keys = [k if isinstance(k, tuple) else (k, None) for k in keys]
        out: list = [None] * len(keys)
        images, where = [], []
        for pos, (i, _) in enumerate(keys):
            try:
                images.append(self.reader(self.items[i]))
                where.append(pos)
            except Exception as err:  # noqa: BLE001  (any decoder error: PIL's, OS, a corrupt array)
                out[pos] = BadSample(self.reader.where(self.items[i]), f"{type(err).__name__}: {err}")
        if not where:
            return out
        same = all(isinstance(img, torch.Tensor) and img.shape == images[0].shape for img in images)
        if same and not self.transform.random:
            xs = self.transform.batch(images, [self.shift_seed + keys[p][0] for p in where])
        else:
            xs = [self._one(img, *keys[p]) for img, p in zip(images, where)]
        for x, p in zip(xs, where):
            out[p] = (x, self.labels[keys[p][0]])
        return out

    def _one(self, img, i: int, seed: int | None) -> torch.Tensor:
        if seed is None or not self.transform.random:
            return self.transform(img, self.shift_seed + i)
        with torch.random.fork_rng(devices=[]):  # this sample's own augmentation draws
            torch.manual_seed(seed)
            state = random.getstate()
            random.seed(seed)
            try:
                return self.transform(img, self.shift_seed + i)
            finally:
                random.setstate(state)

    def subset(self, positions: Sequence[int]) -> "TaskDataset":
        return TaskDataset([self.items[i] for i in positions], [self.labels[i] for i in positions], self.reader,
                           self.transform, self.shift_seed, self.where)

    def with_transform(self, transform: ToInput) -> "TaskDataset":
        return TaskDataset(self.items, self.labels, self.reader, transform, self.shift_seed, self.where)


class SeededBatches(Sampler):
    """An epoch's batches: the order (``torch.randperm`` from ``seed``, or the split's order) cut
    into global batches of ``batch_size``, of which rank ``rank`` of ``world`` takes every
    ``world``-th position (the order padded by wrapping to a multiple of ``world``, as
    ``DistributedSampler``; the union of the ranks' batches is the single-process batch). Each
    index comes with its own augmentation seed. ``cycles`` > 1 (None: forever) goes on with new
    orders from the same generator; a batch never spans two cycles."""

    def __init__(self, n: int, batch_size: int, seed: int | None = None, rank: int = 0, world: int = 1,
                 cycles: int | None = 1, pad: bool = True):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world, self.cycles, self.pad = rank, world, cycles, pad

    def __len__(self) -> int:
        padded = self.n + ((-self.n) % self.world if self.pad else 0)
        return -(-padded // self.batch_size) * (self.cycles or 1)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gen = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        cycle = 0
        while self.cycles is None or cycle < self.cycles:
            order = torch.randperm(self.n, generator=gen) if gen is not None else torch.arange(self.n)
            pad = (-self.n) % self.world if self.pad else 0
            if pad:
                order = torch.cat([order, order[:pad]])
            base = (self.seed or 0) * 1_000_003 + cycle * 7_919
            for k in range(0, len(order), self.batch_size):
                mine = order[k : k + self.batch_size][self.rank :: self.world].tolist()
                if mine:
                    yield [(i, base + i) for i in mine]
            cycle += 1


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    bad: list[BadSample] = field(default_factory=list)


def collate(samples: list) -> Batch:
    good = [s for s in samples if not isinstance(s, BadSample)]
    bad = [s for s in samples if isinstance(s, BadSample)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.int64), bad)
    return Batch(torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good], dtype=torch.int64), bad)


class BadImages:
    """What to do with samples that could not be decoded: stop naming the first (``error``), or
    count every distinct one (``skip``) for the unit's results."""

    def __init__(self, policy: str = "error"):
        self.policy = policy
        self.skipped: dict[str, str] = {}

    def check(self, batch: Batch, where: str) -> Batch:
        for b in batch.bad:
            if self.policy == "error":
                raise DataError(f"{b.where}: cannot decode image ({b.error}); {where}. Fix or remove the file, or "
                                f"set data.on_bad_image: skip")
            self.skipped.setdefault(b.where, b.error)
        return batch


class Split:
    """One split of a task: its dataset, and loaders over it."""

    def __init__(self, dataset: TaskDataset, workers: int = 0, pin_memory: bool = False, on_bad_image: str = "error"):
        self.dataset = dataset
        self.workers = workers
        self.pin_memory = pin_memory
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor(self.dataset.labels, dtype=torch.int64)

    def subset(self, positions: Sequence[int]) -> "Split":
        return Split(self.dataset.subset(positions), self.workers, self.pin_memory, self.on_bad_image)

    def loader(self, batch_size: int, seed: int | None = None, rank: int = 0, world: int = 1,
               cycles: int | None = 1, pad: bool = True) -> DataLoader:
        """``Batch``es of this rank's share of global batches of ``batch_size``; shuffled from
        ``seed`` (None: in order); ``pad``: every rank the same count, by wrapping (evaluation
        counts each image once instead)."""
        batches = SeededBatches(len(self), batch_size, seed, rank, world, cycles, pad)
        # its own generator: creating an iterator draws a base seed, which must not move the global
        # RNG that the model's own random ops (AdaShare's Gumbel noise) draw from
        return DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers, collate_fn=collate,
                          pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(seed or 0))

    def batches(self, batch_size: int, limit: int | None = None, policy: BadImages | None = None,
                where: str = "") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, y)`` in order, at most ``limit`` images (bad ones handled by ``policy``)."""
        seen = 0
        policy = policy or BadImages(self.on_bad_image)
        for batch in self.loader(batch_size):
            policy.check(batch, where or self.dataset.where)
            x, y = batch.x, batch.y
            if limit is not None:
                x, y = x[: limit - seen], y[: limit - seen]
            if len(y):
                yield x, y
            seen += len(y)
            if limit is not None and seen >= limit:
                return

    def inputs(self, limit: int | None = None, batch_size: int = 256) -> torch.Tensor:
        """The first ``limit`` inputs as one tensor (small splits, calibration, tests)."""
        xs = [x for x, _ in self.batches(batch_size, limit)]
        return torch.cat(xs) if xs else torch.empty(0)

    @classmethod
    def from_tensors(cls, images: torch.Tensor, labels: torch.Tensor, transform: ToInput) -> "Split":
        """A split over in-memory uint8 images (N, C, H, W), e.g. a synthetic benchmark batch."""
        from pipeline.data.readers import ArrayReader

        return cls(TaskDataset(range(len(labels)), labels.tolist(), ArrayReader(images.numpy(), "tensor"), transform))


@dataclass
class TaskData:
    name: str
    num_classes: int
    train: Split  # with the training transform (augmentation)
    val: Split
    test: Split
    classes: list[str] = field(default_factory=list)
    train_eval: Split | None = None  # the train images with the evaluation transform (norm re-estimation, calibration)

    def __post_init__(self):
        if self.train_eval is None:
            self.train_eval = self.train

    def shifted(self, name: str, domain: str) -> "TaskData":
        """The same images and labels in another domain (a DomainNet-style sibling task)."""
        def shift(s: Split) -> Split:
            return Split(s.dataset.with_transform(s.dataset.transform.with_domain(domain)), s.workers, s.pin_memory,
                         s.on_bad_image)

        return TaskData(name, self.num_classes, shift(self.train), shift(self.val), shift(self.test), self.classes,
                        shift(self.train_eval))
