"""A few-thousand-parameter convnet for fast tests (timm's ``test_*`` models play the same
role there): a stem and two inverted residuals with a depthwise conv, as EfficientNet has."""
from __future__ import annotations

import torch
from torch import nn


class TinyBlock(nn.Module):
    """Inverted residual with a depthwise conv, like EfficientNet's, at toy width."""

    def __init__(self, c: int, expand: int = 2, kernel: int = 3):
        super().__init__()
        h = c * expand
        self.conv_pw = nn.Conv2d(c, h, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(h)
        self.conv_dw = nn.Conv2d(h, h, kernel, padding=kernel // 2, groups=h, bias=False)
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

    def __init__(self, width: int = 8, dw_kernel: int = 3):
        """``dw_kernel``: the depthwise convs' kernel (odd; 5 at 8 px is larger than their 4x4
        maps, as in EfficientNet's late blocks at 64 px)."""
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(TinyBlock(width, kernel=dw_kernel), TinyBlock(width, kernel=dw_kernel))
        self.proj = nn.Linear(width, self.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.blocks(x)
        return self.proj(x.mean((2, 3)))
