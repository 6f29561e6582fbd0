"""Data from files: a file list, class folders with train/test, and images that cannot be read
(named with their task and split, or skipped and reported, never silently)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import parse_config
from pipeline.core.io import read_json
from pipeline.data import DataError, TaskConfig, load_task
from pipeline.stages.runner import Runner
from tests.conftest import tiny_config


def _images(folder, n: int, classes: int = 2, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` small JPEG/PNG files of mixed sizes under ``folder/c<k>/``; (relative path, label)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = i % classes
        d = folder / f"c{label}"
        d.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (int(rng.integers(12, 40)), int(rng.integers(12, 40)), 3), dtype=np.uint8)
        arr[..., label] = 255  # a colour per class: learnable
        name = f"{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(arr).save(d / name)
        out.append((f"c{label}/{name}", label))
    return out


def test_file_list_csv_and_jsonl_with_splits(tmp_path):
    files = _images(tmp_path / "img", 30)
    csv = tmp_path / "list.csv"
    csv.write_text("path,label,split\n" + "\n".join(f"img/{p},{'cat' if y else 'dog'},{'test' if i < 6 else 'train'}"
                                                    for i, (p, y) in enumerate(files)))
    data = load_task(TaskConfig(name="l", source={"type": "file_list", "root": str(csv)}, val_size=4), 16, 0)
    assert data.classes == ["cat", "dog"] and (len(data.train), len(data.val), len(data.test)) == (20, 4, 6)
    assert data.test.inputs().shape == (6, 3, 16, 16)
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text("\n".join(json.dumps({"path": f"img/{p}", "label": y}) for p, y in files))
    data = load_task(TaskConfig(name="l", source={"type": "file_list", "root": str(jsonl)}, val_size=4), 16, 0)
    assert data.classes == ["0", "1"] and len(data.test) == 6  # a seeded fifth held out for testing
    jsonl.write_text('{"path": "img/x.png"}\n')
    with pytest.raises(DataError, match=r"list\.jsonl:1: needs 'path' and 'label'"):
        load_task(TaskConfig(name="l", source={"type": "file_list", "root": str(jsonl)}), 16, 0)


def test_train_and_val_folders_make_val_the_test_split(tmp_path):
    _images(tmp_path / "train", 20)
    _images(tmp_path / "val", 6, seed=1)
    data = load_task(TaskConfig(name="f", source={"type": "image_folder", "root": str(tmp_path)}, val_size=4), 16, 0)
    assert (len(data.train), len(data.val), len(data.test)) == (16, 4, 6)
    assert all(i.startswith("val/") for i in data.test.dataset.items)


def _folder_config(tmp_path, root, **over) -> dict:
    return tiny_config(tmp_path, tasks=[{"name": "shapes", "source": {"type": "image_folder", "root": str(root)},
                                         "val_size": 4}], methods=["linear_probe"], **over)


def test_a_file_that_is_not_an_image_is_named_before_training(tmp_path):
    root = tmp_path / "data"
    _images(root, 20)
    (root / "c0" / "notes.jpg").write_text("a text file saved as .jpg")
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"c0/notes\.jpg: not a readable image .*task 'shapes', train split.*"
                                        r"on_bad_image: skip"):
        Runner(parse_config(_folder_config(tmp_path, root)), out, progress=False, log=lambda s: None).run()
    assert not (out / "prepared").exists()  # nothing half-written


def test_a_truncated_jpeg_is_named_with_task_and_split_or_skipped_and_reported(tmp_path):
    root = tmp_path / "data"
    files = _images(root, 24)
    victim = next(root / p for p, _ in files if p.endswith(".jpg"))
    victim.write_bytes(victim.read_bytes()[:-64])  # the header is fine, the image data ends early
    with pytest.raises(DataError, match=rf"{victim.name}: cannot decode image .*task 'shapes', split '(train|val|test)'"):
        Runner(parse_config(_folder_config(tmp_path, root)), tmp_path / "a", progress=False, log=lambda s: None).run()
    logs = []
    cfg = parse_config(_folder_config(tmp_path, root, data={"on_bad_image": "skip"}))
    Runner(cfg, tmp_path / "b", progress=False, log=logs.append).run(until="train")
    result = read_json(tmp_path / "b" / "train" / "linear_probe" / "shapes" / "result.json")
    split = next(s for s in ("train", "val", "test")
                 if str(victim.relative_to(root)) in read_json(tmp_path / "b" / "prepared" / "shapes.json")["splits"][s]["items"])
    if split == "train":  # seen by training: counted in the unit's results
        assert list(result["skipped_images"]) == [str(victim)]
    assert torch.isfinite(torch.tensor(result["test_acc"]))
