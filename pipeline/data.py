"""Task specs -> in-memory image tensors, with deterministic domain shifts and splits.

Every task becomes three uint8 tensors (N, 3, S, S) at the backbone's image size plus
labels. Domain shifts of one labelled set (sketch, negative, texture, low resolution)
give DomainNet-style tasks: same labels, different domains. Everything is seeded, so the
same config gives the same pixels, and the prepare stage can be skipped by hash.
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import TaskConfig

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"


class DataError(ValueError):
    """A task whose data cannot be read; the message names the task and the file."""


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


# ---------------------------------------------------------------- sources (raw uint8, N x C x H x W)


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


def _fashion_mnist(root: str | None):
    r = Path(root or FASHION_MNIST_ROOT)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = _read_idx(_find(r, f"{prefix}-images-idx3-ubyte"))
        y = _read_idx(_find(r, f"{prefix}-labels-idx1-ubyte"))
        if len(x) != len(y):
            raise DataError(f"{r}: {split} images ({len(x)}) and labels ({len(y)}) differ in count")
        out[split] = (torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))
    return out["train"], out["test"], 10


def _digits(seed: int):
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


def _image_folder(root: str, size: int, seed: int):
    r = Path(root)
    if (r / "train").is_dir() and (r / "test").is_dir():
        train, classes = _load_folder(r / "train", size)
        test, _ = _load_folder(r / "test", size, classes)
        return train, test, len(classes)
    (x, y), classes = _load_folder(r, size)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, len(y) // 5)
    return (x[perm[n_test:]], y[perm[n_test:]]), (x[perm[:n_test]], y[perm[:n_test]]), len(classes)


def _torchvision(name: str, root: str):
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


# ---------------------------------------------------------------- domain shifts (float [0,1], N x 3 x H x W)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def sketch(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Sobel edge magnitude, dark strokes on white: a line drawing of the image."""
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    g = F.pad(_gray(x), (1, 1, 1, 1), mode="replicate")  # zero padding would draw a frame
    gx = F.conv2d(g, k.view(1, 1, 3, 3))
    gy = F.conv2d(g, k.t().reshape(1, 1, 3, 3))
    mag = (gx**2 + gy**2).sqrt()
    mag = mag / mag.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-2)  # a blank image stays blank
    return (1.0 - mag).expand(-1, 3, -1, -1).contiguous()


def negative(x: torch.Tensor, seed: int) -> torch.Tensor:
    return 1.0 - x


def texture(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Put a seeded striped, coloured texture into the (dark) background of every image."""
    n, _, h, w = x.shape
    gen = torch.Generator().manual_seed(seed)
    theta = torch.rand(n, 1, 1, generator=gen) * torch.pi
    freq = 0.15 + 0.35 * torch.rand(n, 1, 1, generator=gen)
    colour = 0.3 + 0.7 * torch.rand(n, 3, 1, 1, generator=gen)
    v, u = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    stripes = 0.5 + 0.5 * torch.sin(freq * (u * theta.cos() + v * theta.sin()) * 2 * torch.pi / 4)
    tex = stripes.unsqueeze(1) * colour * 0.6
    background = (_gray(x) < 0.15).to(x.dtype)
    return background * tex + (1 - background) * x


def lowres(x: torch.Tensor, seed: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, h // 4), max(1, w // 4)), mode="area")
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


SHIFTS = {"none": lambda x, seed: x, "sketch": sketch, "negative": negative, "texture": texture, "lowres": lowres}


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
            train, test, k = _fashion_mnist(src.root)
        elif src.type == "digits":
            train, test, k = _digits(seed)
        elif src.type == "image_folder":
            train, test, k = _image_folder(src.root, image_size, seed)
        else:
            train, test, k = _torchvision(src.dataset, src.root)
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
