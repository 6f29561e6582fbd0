"""Deterministic domain shifts of one labelled set (sketch, negative, texture, low
resolution): DomainNet-style tasks with the same labels in different domains. Float images in
[0, 1], (N, 3, H, W), one seed per image (the texture's stripes), so the same config gives the
same pixels, one image at a time or in batches."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def sketch(x: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """Sobel edge magnitude, dark strokes on white: a line drawing of the image."""
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    g = F.pad(_gray(x), (1, 1, 1, 1), mode="replicate")  # zero padding would draw a frame
    gx = F.conv2d(g, k.view(1, 1, 3, 3))
    gy = F.conv2d(g, k.t().reshape(1, 1, 3, 3))
    mag = (gx**2 + gy**2).sqrt()
    mag = mag / mag.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-2)  # a blank image stays blank
    return (1.0 - mag).expand(-1, 3, -1, -1).contiguous()


def negative(x: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    return 1.0 - x


def texture(x: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """Put a seeded striped, coloured texture into the (dark) background of every image."""
    n, _, h, w = x.shape
    draws = [torch.rand(5, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    r = torch.stack(draws) if draws else torch.zeros(0, 5)
    theta = (r[:, 0] * torch.pi).view(n, 1, 1)
    freq = (0.15 + 0.35 * r[:, 1]).view(n, 1, 1)
    colour = (0.3 + 0.7 * r[:, 2:5]).view(n, 3, 1, 1)
    v, u = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    stripes = 0.5 + 0.5 * torch.sin(freq * (u * theta.cos() + v * theta.sin()) * 2 * torch.pi / 4)
    tex = stripes.unsqueeze(1) * colour * 0.6
    background = (_gray(x) < 0.15).to(x.dtype)
    return background * tex + (1 - background) * x


def lowres(x: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, h // 4), max(1, w // 4)), mode="area")
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


SHIFTS = {"none": lambda x, seeds: x, "sketch": sketch, "negative": negative, "texture": texture, "lowres": lowres}
