"""Where a task's labelled images come from, as raw uint8 tensors (N, C, H, W) and labels:
Fashion-MNIST's IDX files, scikit-learn's digits, an image folder, a torchvision dataset with a
local root. Nothing is ever downloaded."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.errors import TaskfoldError

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"


class DataError(TaskfoldError, ValueError):
    """A task whose data cannot be read; the message names the task and the file."""


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        _, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if dtype_code != 0x08:
            raise ValueError(f"element type 0x{dtype_code:02x}, expected unsigned byte (0x08)")
        shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(shape)
    except (OSError, EOFError, struct.error, ValueError) as err:
        raise DataError(f"{path}: not a readable IDX file: {err}") from None


def _find(root: Path, stem: str) -> Path:
    for cand in (root / f"{stem}.gz", root / stem):
        if cand.is_file():
            return cand
    raise DataError(f"Fashion-MNIST file {stem}(.gz) not found in {root} (Debian: apt-get install dataset-fashion-mnist)")


def fashion_mnist(root: str | None):
    r = Path(root or FASHION_MNIST_ROOT)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = _read_idx(_find(r, f"{prefix}-images-idx3-ubyte"))
        y = _read_idx(_find(r, f"{prefix}-labels-idx1-ubyte"))
        if len(x) != len(y):
            raise DataError(f"{r}: {split} images ({len(x)}) and labels ({len(y)}) differ in count")
        out[split] = (torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))
    return out["train"], out["test"], 10


def digits(seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 3
    te, tr = perm[:n_test], perm[n_test:]
    return (x[tr], y[tr]), (x[te], y[te]), 10


def _load_folder(folder: Path, size: int, classes: list[str] | None = None):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    try:
        ds = ImageFolder(str(folder))
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"{folder}: not an image folder (one sub-folder per class): {err}") from None
    if classes is not None and ds.classes != classes:
        raise DataError(f"{folder}: classes {ds.classes} differ from the train folder's {classes}")
    xs, ys = [], []
    for path, label in ds.samples:
        img = pil_to_tensor(ds.loader(path).convert("RGB")).unsqueeze(0).float()
        xs.append(F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
        ys.append(label)
    return (torch.cat(xs).round().clamp(0, 255).to(torch.uint8), torch.tensor(ys)), ds.classes


def image_folder(root: str, size: int, seed: int):
    r = Path(root)
    if (r / "train").is_dir() and (r / "test").is_dir():
        train, classes = _load_folder(r / "train", size)
        test, _ = _load_folder(r / "test", size, classes)
        return train, test, len(classes)
    (x, y), classes = _load_folder(r, size)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, len(y) // 5)
    return (x[perm[n_test:]], y[perm[n_test:]]), (x[perm[:n_test]], y[perm[:n_test]]), len(classes)


def torchvision_dataset(name: str, root: str):
    import torchvision

    cls = getattr(torchvision.datasets, name, None)
    if cls is None:
        raise DataError(f"torchvision has no dataset {name!r}")
    out = []
    for train in (True, False):
        try:
            try:
                ds = cls(root, train=train, download=False)
            except TypeError:
                ds = cls(root, split="train" if train else "test", download=False)
        except RuntimeError as err:
            raise DataError(f"{name} at {root}: {err} (taskfold never downloads; put the files there)") from None
        data = getattr(ds, "data", None)
        if data is None:
            raise DataError(f"{name}: dataset has no in-memory .data; use an ImageFolder export of it")
        x = torch.as_tensor(np.asarray(data))
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        y = torch.as_tensor(np.asarray(getattr(ds, "targets", getattr(ds, "labels", None))), dtype=torch.int64)
        out.append((x.to(torch.uint8).contiguous(), y))
    classes = getattr(ds, "classes", None)
    return out[0], out[1], len(classes) if classes else int(out[0][1].max()) + 1
