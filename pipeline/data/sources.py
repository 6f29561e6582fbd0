"""Where a task's labelled images come from: a source opens to *pools* of items (an index into an
in-memory array, a file path, a torchvision dataset position) with labels and class names, and
a reader that turns an item into an image. Nothing is decoded here and nothing is downloaded.

* ``fashion_mnist``: the four IDX files (Debian's ``dataset-fashion-mnist`` by default);
* ``digits``: scikit-learn's bundled 8x8 digits (a seeded third is the test pool);
* ``image_folder``: a root with one folder per class (a seeded fifth is the test pool), or
  ``train/`` with ``test/`` and/or ``val/`` class folders (ImageNet's layout: with no ``test/``,
  ``val/`` is the test pool);
* ``file_list``: a CSV (``path,label[,split]``, optional header) or JSON-lines file
  (``{"path", "label", "split"}``); paths relative to the list; labels are class names or
  integers; rows without a split are the train pool (a seeded fifth becomes the test pool when
  no row says ``test``);
* ``torchvision``: a torchvision dataset class with a local root.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from pipeline.data.config import SourceConfig
from pipeline.data.errors import DataError
from pipeline.data.readers import IMAGE_SUFFIXES, ArrayReader, FileReader, TorchvisionReader, open_torchvision

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
TEST_SHARE = 5  # a fifth of a pool without a test split is held out for testing


Pool = tuple[list, list[int]]  # items, labels


@dataclass
class Pools:
    reader: object
    classes: list[str]
    train: Pool
    test: Pool
    val: Pool | None = None  # a given validation split; else carved from train
    crop_pct: float | None = None  # the source's own centre crop (None: the backbone's)
    fingerprint: str = ""
    in_memory: bool = False  # the whole source is an array in memory (no decoding: no workers needed)
    files: list[str] = field(default_factory=list)  # file items to check at prepare


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


def _held_out(n: int, seed: int, share: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) positions of a pool of ``n``: a seeded 1/share held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_out = max(1, n // share)
    return perm[n_out:], perm[:n_out]


@lru_cache(maxsize=8)
def _fashion_mnist_arrays(root: str, stamp: tuple) -> tuple[np.ndarray, np.ndarray, int]:
    """Train and test images and labels, one array each (train first), and the train count."""
    r = Path(root)
    xs, ys = [], []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = _read_idx(_find(r, f"{prefix}-images-idx3-ubyte"))
        y = _read_idx(_find(r, f"{prefix}-labels-idx1-ubyte"))
        if len(x) != len(y):
            raise DataError(f"{r}: {split} images ({len(x)}) and labels ({len(y)}) differ in count")
        xs.append(x)
        ys.append(y.astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys), len(xs[0])


def fashion_mnist(root: str | None) -> Pools:
    r = root or FASHION_MNIST_ROOT
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(r).glob("*ubyte*")))
    images, labels, n_train = _fashion_mnist_arrays(r, stamp)  # read once per process while unchanged
    items = list(range(len(labels)))
    return Pools(ArrayReader(images, "fashion_mnist"), list(FASHION_MNIST_CLASSES),
                 (items[:n_train], labels[:n_train].tolist()), (items[n_train:], labels[n_train:].tolist()),
                 crop_pct=1.0, fingerprint=_files_fingerprint(Path(r), None), in_memory=True)


def digits(seed: int) -> Pools:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    labels = d.target.astype(np.int64)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = len(labels) // 3
    te, tr = perm[:n_test].tolist(), perm[n_test:].tolist()
    return Pools(ArrayReader(images, "digits"), [str(i) for i in range(10)], (tr, labels[tr].tolist()),
                 (te, labels[te].tolist()), crop_pct=1.0, fingerprint=f"sklearn-digits-{len(labels)}", in_memory=True)


def _class_folders(folder: Path) -> dict[str, list[str]]:
    """class name -> image files (relative to ``folder``), classes sorted, files sorted."""
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    out = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(str(p.relative_to(folder)) for p in d.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            out[d.name] = files
    if not out:
        raise DataError(f"{folder}: not an image folder (one sub-folder of images per class; "
                        f"image files end in {', '.join(IMAGE_SUFFIXES)})")
    return out


def image_folder(root: str, seed: int) -> Pools:
    r = Path(root)
    layout = {s: r / s for s in ("train", "val", "test") if (r / s).is_dir()}
    if "train" in layout and len(layout) > 1:
        found = {s: _class_folders(p) for s, p in layout.items()}
        classes = list(found["train"])
        for s, f in found.items():
            if set(f) - set(classes):
                raise DataError(f"{layout[s]}: classes {sorted(set(f) - set(classes))} are not in {layout['train']}")

        def pool(s: str) -> Pool:
            items = [f"{s}/{f}" for c in classes for f in found[s].get(c, [])]
            return items, [classes.index(c) for c in classes for _ in found[s].get(c, [])]

        test = "test" if "test" in layout else "val"
        val = pool("val") if "val" in layout and test == "test" else None
        pools = Pools(FileReader(r), classes, pool("train"), pool(test), val)
    else:
        found = _class_folders(r)
        classes = list(found)
        items = [f for c in classes for f in found[c]]
        labels = [i for i, c in enumerate(classes) for _ in found[c]]
        keep, out = _held_out(len(items), seed, TEST_SHARE)
        pools = Pools(FileReader(r), classes, ([items[i] for i in keep], [labels[i] for i in keep]),
                      ([items[i] for i in out], [labels[i] for i in out]))
    pools.files = [i for p in (pools.train, pools.test, pools.val) if p for i in p[0]]
    pools.fingerprint = _files_fingerprint(r, pools.files)
    return pools


def _list_rows(path: Path) -> list[dict]:
    text = path.read_text()
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{n}: not a JSON object: {err}") from None
                if not isinstance(row, dict) or "path" not in row or "label" not in row:
                    raise DataError(f"{path}:{n}: needs 'path' and 'label'")
                rows.append(row)
        return rows
    reader = list(csv.reader(text.splitlines()))
    if reader and [c.strip().lower() for c in reader[0][:2]] == ["path", "label"]:
        reader = reader[1:]
    rows = []
    for n, rec in enumerate(reader, 1):
        if not rec or not rec[0].strip():
            continue
        if len(rec) < 2:
            raise DataError(f"{path}: row {n}: expected path,label[,split], got {rec}")
        rows.append({"path": rec[0].strip(), "label": rec[1].strip(), **({"split": rec[2].strip()} if len(rec) > 2 else {})})
    return rows


def file_list(root: str, seed: int) -> Pools:
    path = Path(root)
    if not path.is_file():
        raise DataError(f"{path}: a file list must be a CSV or JSON-lines file")
    rows = _list_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    labels_raw = [r["label"] for r in rows]
    if all(isinstance(v, int) or (isinstance(v, str) and v.lstrip("-").isdigit()) for v in labels_raw):
        ints = [int(v) for v in labels_raw]
        if min(ints) < 0:
            raise DataError(f"{path}: negative label {min(ints)}")
        classes = [str(i) for i in range(max(ints) + 1)]
        labels = ints
    else:
        classes = sorted({str(v) for v in labels_raw})
        labels = [classes.index(str(v)) for v in labels_raw]
    split = [r.get("split", "train") or "train" for r in rows]
    bad = sorted(set(split) - {"train", "val", "test"})
    if bad:
        raise DataError(f"{path}: unknown split(s) {bad}; use train, val or test")
    pools = {s: ([r["path"] for r, sp in zip(rows, split) if sp == s], [y for y, sp in zip(labels, split) if sp == s])
             for s in ("train", "val", "test")}
    if not pools["test"][0]:
        items, ys = pools["train"]
        keep, out = _held_out(len(items), seed, TEST_SHARE)
        pools["train"] = ([items[i] for i in keep], [ys[i] for i in keep])
        pools["test"] = ([items[i] for i in out], [ys[i] for i in out])
    result = Pools(FileReader(path.parent), classes, pools["train"], pools["test"],
                   pools["val"] if pools["val"][0] else None)
    result.files = [r["path"] for r in rows]
    result.fingerprint = _files_fingerprint(path.parent, result.files, extra=path)
    return result


def torchvision_source(name: str, root: str) -> Pools:
    pools = {}
    for split in ("train", "test"):
        ds = open_torchvision(name, root, split == "train")
        targets = getattr(ds, "targets", None)
        if targets is None:
            targets = getattr(ds, "labels", None)
        if targets is None:
            targets = getattr(ds, "_labels", None)
        if targets is None:
            targets = [ds[i][1] for i in range(len(ds))]
        labels = [int(t) for t in (targets.tolist() if hasattr(targets, "tolist") else targets)]
        pools[split] = ([[split, i] for i in range(len(labels))], labels)
        classes = list(getattr(ds, "classes", []) or [])
    k = max(max(pools["train"][1]), max(pools["test"][1])) + 1
    classes = [str(c) for c in classes] if len(classes) >= k else [str(i) for i in range(k)]
    return Pools(TorchvisionReader(name, root), classes, pools["train"], pools["test"],
                 fingerprint=_files_fingerprint(Path(root), None, extra=name))


def open_source(src: SourceConfig, seed: int) -> Pools:
    """The pools of a source; ``DataError`` naming the file or folder if it cannot be read."""
    if src.type == "fashion_mnist":
        return fashion_mnist(src.root)
    if src.type == "digits":
        return digits(seed)
    if src.root is not None and not Path(src.root).exists():
        raise DataError(f"{src.type} root {src.root} does not exist")
    if src.type == "image_folder":
        return image_folder(src.root, seed)
    if src.type == "file_list":
        return file_list(src.root, seed)
    return torchvision_source(src.dataset, src.root)


def _files_fingerprint(root: Path, files: list[str] | None, extra=None) -> str:
    """sha256 over (path, size) of the given files under ``root`` (every file when None): a data
    set that changes on disk gives another fingerprint, so the prepare stage runs again."""
    h = hashlib.sha256(str(extra or "").encode())
    if extra is not None and isinstance(extra, Path) and extra.is_file():
        h.update(extra.read_bytes())
    if files is None:
        files = sorted(str(Path(d, f).relative_to(root)) for d, _, fs in os.walk(root) for f in fs) \
            if root.is_dir() else []
    for f in files:
        p = root / f
        try:
            size = p.stat().st_size
        except OSError:
            size = -1  # a listed file that is missing: the prepare stage names it
        h.update(f"{f}\0{size}\n".encode())
    return h.hexdigest()[:16]
