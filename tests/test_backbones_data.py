"""Backbone weights from every offline source, and the data sources and domain shifts."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.core.backbones import PACKAGED, BackboneError, build_backbone
from pipeline.config import TaskConfig
from pipeline.data import DataError, load_task, negative, sketch


def test_packaged_efficientnet_lite0_loads_all_296_tensors_in_order():
    raw = PACKAGED["efficientnet_lite0"]()
    assert len(raw) == 296
    bb = build_backbone("efficientnet_lite0", "packaged")
    features = bb.features.state_dict()
    # every backbone tensor of the package is in the model, in order (the classifier was dropped)
    raw_values = [v for k, v in raw.items() if not k.startswith("_fc.")]
    assert len(raw_values) == len(features)
    for (name, got), want in zip(features.items(), raw_values):
        assert torch.equal(got, want), name
    assert bb.num_features == 1280 and bb.mean == pytest.approx((0.485, 0.456, 0.406))


def test_local_file_and_hub_loader_paths_read_local_files(tmp_path):
    full = build_backbone("efficientnet_lite0", "packaged")
    # a local safetensors file of the full timm model (classifier included) via the file path
    import timm

    model = timm.create_model("efficientnet_lite0")
    from pipeline.core.backbones import load_in_order

    load_in_order(model, PACKAGED["efficientnet_lite0"](), "test")
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    from_file = build_backbone("efficientnet_lite0", str(path))
    # timm's own pretrained loader (the online hub path), pointed at the local file
    from_hub = build_backbone("efficientnet_lite0", "hub", {"pretrained_cfg_overlay": {"file": str(path)}})
    for bb in (from_file, from_hub):
        for (k, a), b in zip(bb.features.state_dict().items(), full.features.state_dict().values()):
            assert torch.equal(a, b), k


def test_weights_for_another_backbone_name_the_tensor(tmp_path):
    other = build_backbone("tiny_convnet", "none", {"width": 12})
    path = tmp_path / "w.safetensors"
    save_file(other.features.state_dict(), str(path))
    with pytest.raises(BackboneError, match=r"tensor 'stem\.weight' has shape \(12, 3, 3, 3\), expected \(8, 3, 3, 3\)"):
        build_backbone("tiny_convnet", str(path))
    with pytest.raises(BackboneError, match="weights do not fit this backbone; missing"):
        build_backbone("efficientnet_lite0", str(path))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="bad.pth: cannot read weights"):
        build_backbone("tiny_convnet", str(bad))


def test_torchvision_backbone_drops_its_classifier():
    bb = build_backbone("torchvision:resnet18", "none")
    assert bb.num_features == 512
    assert bb.features.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 512)


@pytest.mark.parametrize("name", ["tf_mobilenetv3_small_minimal_100", "resnet18"])
def test_timm_head_reads_what_the_features_return(name):
    """A head as wide as the features' output: MobileNetV3's pre-logits 1x1 conv after pooling
    returns 1024 values where ``num_features`` says 576."""
    bb = build_backbone(name, "none")
    x = torch.zeros(2, 3, 32, 32)
    assert bb.features.eval()(x).shape == (2, bb.num_features)
    assert bb.task_net(7).eval()(x).shape == (2, 7)


def _write_idx(path, arr: np.ndarray):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_local_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    cfg = TaskConfig(name="fm", source={"type": "fashion_mnist", "root": str(tmp_path)}, val_size=10, test_size=8)
    data = load_task(cfg, 16, 0)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 8)
    x = data.train.inputs()
    assert x.shape == (30, 3, 16, 16) and x.dtype == torch.float32
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match=r"task 'fm': .*t10k-labels-idx1-ubyte\.gz: not a readable IDX file"):
        load_task(cfg, 16, 0)


def test_image_folder_source(tmp_path):
    """Real files of mixed sizes and modes (RGB JPEG, grayscale PNG, RGBA PNG, palette GIF) in
    class folders: every one decodes to the input size, labels follow the folder names."""
    from PIL import Image

    rng = np.random.default_rng(0)
    modes = [("RGB", "jpg"), ("L", "png"), ("RGBA", "png"), ("P", "gif")]
    for i in range(24):
        label = i % 3
        folder = tmp_path / f"class_{label}"
        folder.mkdir(exist_ok=True)
        mode, ext = modes[i % len(modes)]
        w, h = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        img.save(folder / f"{i}.{ext}")
    (tmp_path / "class_0" / "notes.txt").write_text("not an image, not listed")
    cfg = TaskConfig(name="folder", source={"type": "image_folder", "root": str(tmp_path)}, val_size=4)
    data = load_task(cfg, 16, 0)
    assert len(data.train) + len(data.val) + len(data.test) == 24
    assert data.num_classes == 3 and data.classes == ["class_0", "class_1", "class_2"]
    x = torch.cat([data.train.inputs(), data.val.inputs(), data.test.inputs()])
    assert x.shape == (24, 3, 16, 16) and torch.isfinite(x).all()
    for split in (data.train, data.val, data.test):
        for item, label in zip(split.dataset.items, split.dataset.labels):
            assert item.startswith(f"class_{label}/")


def test_splits_are_deterministic_and_disjoint():
    cfg = TaskConfig(name="d", source={"type": "digits"}, train_size=50, val_size=20, test_size=30)
    a, b = load_task(cfg, 8, 0), load_task(cfg, 8, 0)
    assert torch.equal(a.train.inputs(), b.train.inputs()) and torch.equal(a.test.labels, b.test.labels)
    c = load_task(cfg, 8, 1)
    assert not torch.equal(a.train.inputs(), c.train.inputs())
    assert not set(a.train.dataset.items) & set(a.val.dataset.items)


@pytest.mark.parametrize("domain", ["sketch", "negative", "texture", "lowres"])
def test_domains_change_pixels_but_not_labels(domain):
    plain = load_task(TaskConfig(name="d", source={"type": "digits"}, train_size=30, val_size=10), 16, 0)
    shifted = load_task(TaskConfig(name="d", source={"type": "digits"}, domain=domain, train_size=30, val_size=10), 16, 0)
    assert torch.equal(plain.train.labels, shifted.train.labels)
    assert (plain.train.inputs() - shifted.train.inputs()).abs().mean() > 0.08  # > 5 of 255 in pixel values


def test_shift_definitions():
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(negative(x, [0, 1]), 1 - x)
    flat = torch.full((1, 3, 8, 8), 0.4)
    assert torch.allclose(sketch(flat, [0]), torch.ones(1, 3, 8, 8))  # no edges: a blank white page


def test_torchvision_dataset_by_name_from_a_local_root(tmp_path):
    """torchvision's own FashionMNIST reader on the Debian files, laid out as it expects."""
    import shutil

    from pipeline.data import FASHION_MNIST_ROOT

    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(f"{FASHION_MNIST_ROOT}/{f}.gz") as src, open(raw / f, "wb") as dst:
            shutil.copyfileobj(src, dst)  # torchvision keeps the files unpacked after its download
    cfg = TaskConfig(name="tv", source={"type": "torchvision", "dataset": "FashionMNIST", "root": str(tmp_path)},
                     train_size=50, val_size=10, test_size=20, crop_pct=1.0)
    via_torchvision = load_task(cfg, 16, 0)
    direct = load_task(TaskConfig(name="tv", source={"type": "fashion_mnist"}, train_size=50, val_size=10, test_size=20), 16, 0)
    assert via_torchvision.num_classes == 10 and via_torchvision.classes == direct.classes
    assert torch.equal(via_torchvision.test.labels, direct.test.labels)
    # the same images: torchvision's PIL images through the resize of an image file, the
    # built-in reader's arrays through the tensor resize; both bilinear with antialiasing
    assert (via_torchvision.train.inputs() - direct.train.inputs()).abs().mean() < 0.05
    missing = TaskConfig(name="tv", source={"type": "torchvision", "dataset": "CIFAR10", "root": str(tmp_path)})
    with pytest.raises(DataError, match="taskfold never downloads"):
        load_task(missing, 16, 0)
