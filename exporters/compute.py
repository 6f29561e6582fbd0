"""Compute per inference: floating-point operations of a model on one image.

Counted with ``torch.utils.flop_counter.FlopCounterMode`` (PyTorch's own counter): the
multiply-adds of convolutions and matrix products, two FLOPs each; element-wise ops and
norms are not counted. A model with skipped blocks (AdaShare) runs fewer convolutions and
shows it here, whatever the machine.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_flops(model: nn.Module, image_size: int) -> int:
    was = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size))
    model.train(was)
    return int(counter.get_total_flops())
