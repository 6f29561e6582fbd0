"""From a decoded image to the backbone's input: the spatial transform (timm's, from the
backbone's pretrained config), then the task's domain shift, then normalisation.

* evaluation: resize to ``image_size / crop_pct`` and centre crop (``crop_pct`` 1: resize the
  whole image); timm's ``create_transform(is_training=False)``;
* training (``train.augment``): ``none`` is the evaluation transform; ``standard`` is
  RandomResizedCrop + horizontal flip; any other string is a timm auto-augment spec
  (``rand-m9-mstd0.5``) on top of the standard crop and flip.

A tensor input (a split built from tensors already at the input size) skips the spatial step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.data.shifts import SHIFTS


@dataclass(frozen=True)
class Preprocess:
    """What the backbone expects (timm's ``resolve_data_config``)."""

    image_size: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float = 0.875


def spatial(pre: Preprocess, training: bool, augment: str, crop_pct: float | None):
    """PIL image -> uint8 tensor (3, S, S) at the input size."""
    from timm.data import create_transform

    size = pre.image_size
    crop = crop_pct if crop_pct is not None else pre.crop_pct
    if training and augment != "none":
        return create_transform(size, is_training=True, hflip=0.5, color_jitter=None, interpolation=pre.interpolation,
                                auto_augment=None if augment == "standard" else augment, normalize=False,
                                mean=pre.mean, std=pre.std)
    return create_transform(size, is_training=False, interpolation=pre.interpolation, crop_pct=crop,
                            normalize=False, mean=pre.mean, std=pre.std)


class ToInput:
    """One image (PIL or uint8 tensor) -> the float, shifted, normalised input tensor (3, S, S)."""

    def __init__(self, pre: Preprocess, training: bool = False, augment: str = "none", crop_pct: float | None = None,
                 domain: str = "none"):
        self.pre, self.training, self.augment, self.crop_pct, self.domain = pre, training, augment, crop_pct, domain
        self._spatial = None
        self.mean = torch.tensor(pre.mean).view(3, 1, 1)
        self.std = torch.tensor(pre.std).view(3, 1, 1)

    def with_domain(self, domain: str) -> "ToInput":
        return ToInput(self.pre, self.training, self.augment, self.crop_pct, domain)

    @property
    def random(self) -> bool:
        """Does the transform draw random numbers (so each sample needs its own seed)?"""
        return self.training and self.augment != "none"

    def __call__(self, img, shift_seed: int) -> torch.Tensor:
        return self.batch([img], [shift_seed])[0]

    def batch(self, images: list, shift_seeds: list[int]) -> torch.Tensor:
        """Several images at once (N, 3, S, S): in-memory tensors of one size are resized and
        shifted as one batch (per-image calls of tiny ops are slow); the rest one by one."""
        xs = [self._spatial_one(img) for img in images]
        if any(x.shape[-2:] != xs[0].shape[-2:] for x in xs):
            raise ValueError("images of different sizes after the spatial transform")
        x = torch.stack(xs)
        if x.shape[-1] != self.pre.image_size or x.shape[-2] != self.pre.image_size:
            x = self._resize(x)
        if self.domain != "none":
            x = SHIFTS[self.domain](x, shift_seeds)
        x = x.mul(255.0).round().clamp(0, 255).div(255.0)  # an 8-bit image of the task's domain
        return (x - self.mean) / self.std

    def _spatial_one(self, img) -> torch.Tensor:
        """float [0, 1] (3, H, W): PIL images through the spatial transform, tensors as they are."""
        if isinstance(img, torch.Tensor):
            if img.shape[0] == 1:
                img = img.expand(3, -1, -1)
            if not self.random:
                return img.float().div(255.0)
            from torchvision.transforms.functional import to_pil_image

            img = to_pil_image(img)
        if self._spatial is None:
            self._spatial = spatial(self.pre, self.training, self.augment, self.crop_pct)
        return self._spatial(img).float().div(255.0)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """Small in-memory images (a glyph set's 28x28) to the input size: resize, then centre crop."""
        size = self.pre.image_size
        crop = self.crop_pct if self.crop_pct is not None else self.pre.crop_pct
        scaled = max(size, int(size / crop))
        x = F.interpolate(x, size=(scaled, scaled), mode="bilinear", antialias=True, align_corners=False)
        off = (scaled - size) // 2
        return x[:, :, off : off + size, off : off + size]
