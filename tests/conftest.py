"""Shared fixtures: tiny backbones (a convnet with a depthwise conv, a tiny ViT, the real
EfficientNet-Lite0 structure at random init) and a small real task (sklearn digits)."""
from __future__ import annotations

import pytest
import torch

from pipeline.core.backbones import build_backbone
from pipeline.config import TaskConfig
from pipeline.data import load_task

torch.set_num_threads(2)

TINY_VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2}

# (backbone name, kwargs, image size): the generic table every method is tested over
BACKBONES = {
    "tiny_convnet": ("tiny_convnet", {}, 16),
    "tiny_vit": ("vit_tiny_patch16_224", TINY_VIT, 16),
    "efficientnet_lite0": ("efficientnet_lite0", {}, 32),
}


@pytest.fixture(scope="session")
def backbones():
    torch.manual_seed(0)
    return {k: (build_backbone(name, "none", kw), size) for k, (name, kw, size) in BACKBONES.items()}


@pytest.fixture(scope="session")
def digits16():
    return load_task(TaskConfig(name="digits", source={"type": "digits"}, train_size=96, val_size=32, test_size=64), 16, 0)


@pytest.fixture(scope="session")
def digits32():
    return load_task(TaskConfig(name="digits", source={"type": "digits"}, train_size=64, val_size=32, test_size=32), 32, 0)


def tiny_config(tmp_path, **over) -> dict:
    """A complete run config on the tiny convnet and digits, small enough to run in seconds."""
    cfg = {
        "backbone": {"name": "tiny_convnet", "weights": "none", "image_size": 16},
        "tasks": [
            {"name": "digits", "source": {"type": "digits"}, "train_size": 96, "val_size": 32, "test_size": 48},
            {"name": "digits_neg", "source": {"type": "digits"}, "domain": "negative",
             "train_size": 96, "val_size": 32, "test_size": 48},
        ],
        "methods": ["finetune", "linear_probe", "norm_head", {"name": "taps", "lam": 1.0}, {"name": "ftn", "rank": 2}],
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
        "bench": {"warmup": 1, "runs": 5, "batch_sizes": [1, 4], "forms": False},
        "export": {"forms": []},  # deployment forms have their own tests (test_deploy.py)
    }
    cfg.update(over)
    return cfg
