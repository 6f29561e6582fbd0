"""Turn one item of a task's index into an image. Readers are small and picklable (DataLoader
workers get a copy); whatever they open, they open lazily, in the process that reads."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.data.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class ArrayReader:
    """Items are indices into an in-memory uint8 array (N, H, W) or (N, C, H, W): the built-in
    sources, whose whole data is a few MB. Returns a uint8 tensor (C, H, W)."""

    def __init__(self, images: np.ndarray, name: str):
        self.images = images
        self.name = name

    def __call__(self, item: int) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(self.images[item]))
        return x.unsqueeze(0) if x.ndim == 2 else x

    def where(self, item) -> str:
        return f"{self.name} image #{item}"


class FileReader:
    """Items are paths relative to ``root``; any PIL-readable file, converted to RGB (grayscale,
    palette and RGBA images too)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def __call__(self, item: str):
        from PIL import Image

        with Image.open(self.root / item) as img:
            img.load()  # decode now: a truncated file fails here, not later in a transform
            return img.convert("RGB")

    def where(self, item) -> str:
        return str(self.root / item)


class TorchvisionReader:
    """Items are ``[split, index]`` of a torchvision dataset with a local root (never downloaded)."""

    def __init__(self, dataset: str, root: str):
        self.dataset, self.root = dataset, root
        self._open: dict[str, object] = {}

    def split(self, split: str):
        if split not in self._open:
            self._open[split] = open_torchvision(self.dataset, self.root, split == "train")
        return self._open[split]

    def __call__(self, item):
        from PIL import Image

        split, index = item
        img = self.split(split)[index][0]
        if isinstance(img, torch.Tensor):
            img = Image.fromarray(img.numpy())
        elif isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        return img.convert("RGB")

    def where(self, item) -> str:
        return f"{self.dataset} ({self.root}) {item[0]} #{item[1]}"

    def __getstate__(self):
        return {"dataset": self.dataset, "root": self.root, "_open": {}}


def open_torchvision(name: str, root: str, train: bool):
    import torchvision

    cls = getattr(torchvision.datasets, name, None)
    if cls is None:
        raise DataError(f"torchvision has no dataset {name!r}")
    try:
        try:
            return cls(root, train=train, download=False)
        except TypeError:
            return cls(root, split="train" if train else "test", download=False)
    except RuntimeError as err:
        raise DataError(f"{name} at {root}: {err} (taskfold never downloads; put the files there)") from None
