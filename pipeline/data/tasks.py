"""A task's index (the seeded train/val/test assignment of its source's items, with labels and
class names) and the ``TaskData`` built from it.

The prepare stage records the index, never pixels: ``prepared/<task>.json`` holds the items (file
paths or source positions), labels, class names and the source's fingerprint (a hash of its
file list and sizes); everything else is read lazily by the splits' datasets.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.data.config import TaskConfig
from pipeline.data.dataset import Split, TaskData, TaskDataset
from pipeline.data.errors import DataError
from pipeline.data.sources import Pools, open_source
from pipeline.data.transforms import Preprocess, ToInput

INDEX_FORMAT = "taskfold-index/1"
SPLITS = ("train", "val", "test")


@dataclass
class TaskIndex:
    task: str
    num_classes: int
    classes: list[str]
    splits: dict[str, dict[str, list]]  # split -> {"items": [...], "labels": [...]}
    fingerprint: str = ""
    notes: list[str] = field(default_factory=list)  # what the assignment had to change (subset sizes cut)

    def to_json(self) -> dict:
        return {"format": INDEX_FORMAT, "task": self.task, "num_classes": self.num_classes, "classes": self.classes,
                "fingerprint": self.fingerprint, "notes": self.notes, "splits": self.splits}

    @classmethod
    def from_json(cls, d: dict, where: str) -> "TaskIndex":
        if not isinstance(d, dict) or d.get("format") != INDEX_FORMAT:
            raise DataError(f"{where}: not a taskfold task index ({INDEX_FORMAT}); rerun with --force prepare")
        return cls(d["task"], int(d["num_classes"]), list(d["classes"]), d["splits"], d.get("fingerprint", ""),
                   list(d.get("notes", [])))

    def sizes(self) -> dict[str, int]:
        return {s: len(self.splits[s]["labels"]) for s in SPLITS}


def build_index(task: TaskConfig, pools: Pools, seed: int) -> TaskIndex:
    """The seeded assignment: val carved from the train pool (unless the source gives one), then
    the train subset, then the test subset."""
    gen = torch.Generator().manual_seed(seed)
    items, labels = pools.train
    notes = []
    perm = torch.randperm(len(labels), generator=gen).tolist()
    if pools.val is not None:
        vpos = torch.randperm(len(pools.val[1]), generator=gen).tolist()[: task.val_size]
        val = ([pools.val[0][i] for i in vpos], [pools.val[1][i] for i in vpos])
        train_pos = perm
    else:
        if task.val_size >= len(perm):
            raise DataError(f"task {task.name!r}: val_size {task.val_size} leaves no training images "
                            f"(pool {len(perm)})")
        val = ([items[i] for i in perm[: task.val_size]], [labels[i] for i in perm[: task.val_size]])
        train_pos = perm[task.val_size :]
    if task.train_size is not None and task.train_size > len(train_pos):
        notes.append(f"train_size {task.train_size} > {len(train_pos)} images available: using {len(train_pos)}")
    train_pos = train_pos[: task.train_size]
    test_items, test_labels = pools.test
    test_pos = torch.randperm(len(test_labels), generator=gen).tolist()
    if task.test_size is not None and task.test_size > len(test_pos):
        notes.append(f"test_size {task.test_size} > {len(test_pos)} images available: using {len(test_pos)}")
    test_pos = test_pos[: task.test_size]
    splits = {"train": {"items": [items[i] for i in train_pos], "labels": [labels[i] for i in train_pos]},
              "val": {"items": val[0], "labels": val[1]},
              "test": {"items": [test_items[i] for i in test_pos], "labels": [test_labels[i] for i in test_pos]}}
    for s in SPLITS:
        if not splits[s]["labels"]:
            raise DataError(f"task {task.name!r}: the {s} split is empty")
    return TaskIndex(task.name, len(pools.classes), list(pools.classes), splits, pools.fingerprint, notes)


def shift_seed(task: TaskConfig, seed: int) -> int:
    return seed * 1000 + sum(map(ord, task.name))


def task_data(task: TaskConfig, index: TaskIndex, pools: Pools, pre: Preprocess, seed: int, augment: str = "none",
              workers: int = 0, pin_memory: bool = False, on_bad_image: str = "error") -> TaskData:
    """The task's splits over its index: train with ``augment``, the others with the evaluation
    transform; each split its own range of domain-shift seeds."""
    crop = task.crop_pct if task.crop_pct is not None else pools.crop_pct
    evaluate = ToInput(pre, False, "none", crop, task.domain)
    base = shift_seed(task, seed)

    def split(name: str, transform: ToInput, offset: int) -> Split:
        s = index.splits[name]
        ds = TaskDataset(s["items"], s["labels"], pools.reader, transform, base + offset,
                         f"task {task.name!r}, split {name!r}")
        return Split(ds, workers, pin_memory, on_bad_image)

    train = split("train", ToInput(pre, True, augment, crop, task.domain), 0)
    return TaskData(task.name, index.num_classes, train, split("val", evaluate, 10**6), split("test", evaluate, 2 * 10**6),
                    index.classes, split("train", evaluate, 0))


def open_task_source(task: TaskConfig, seed: int) -> Pools:
    """``open_source``, with the task named in any error."""
    try:
        return open_source(task.source, seed)
    except DataError as err:
        raise DataError(f"task {task.name!r}: {err}") from None


def load_task(task: TaskConfig, image_size: int | Preprocess, seed: int, augment: str = "none",
              workers: int = 0) -> TaskData:
    """Open the task's source and split it (no files written): tests, benchmarks, notebooks."""
    pre = image_size if isinstance(image_size, Preprocess) else Preprocess(image_size)
    pools = open_task_source(task, seed)
    return task_data(task, build_index(task, pools, seed), pools, pre, seed, augment, workers)
