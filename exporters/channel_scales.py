"""Per-task tensors that are one base tensor scaled per output channel.

Folding a task's BatchNorm into a shared conv multiplies each output channel of the conv's
weight by the norm's scale, so norm-trained tasks (norm_head, TAPS's untouched layers) differ in
every conv weight of a graph with norms folded, but only by one number per output channel. A task
then needs to store those numbers, not the weight; the weight is rebuilt as ``base * scale`` when
the task is loaded. In onnxruntime's blocked (NCHWc) weight layout output channel ``o`` sits at
``(o // B, ..., o % B)`` of the data (B the block size: 8 on AVX2, 16 on AVX-512, 1 for a plain
O-first layout), so a tensor's data is viewed as ``(O / B, rest, B)`` and scaled on its first and
last axes. The block size is found from the data and every fit is checked to reproduce the task's
tensor to float32 rounding, so a layout this module does not know is left whole, never guessed.
"""
from __future__ import annotations

import numpy as np

SUFFIX = "@channel_scale"  # a task file's name for the scales of graph tensor ``name``: ``name + SUFFIX``
BLOCKS = (1, 4, 8, 16)
TOLERANCE = 1e-6  # relative to the largest magnitude in the output channel: a few float32 roundings


def blocked(shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """The ``(O / B, rest, B)`` view of a tensor of ``shape`` that scales of ``scale_shape`` (``(O / B, B)``)
    multiply; None when they cannot belong together."""
    size = int(np.prod(shape))
    if len(shape) < 2 or len(scale_shape) != 2 or min(scale_shape) < 1:
        return None
    blocks, width = scale_shape
    if blocks * width != shape[0] or size % shape[0]:
        return None
    return blocks, size // shape[0], width


def fit(tensors: list[np.ndarray]) -> list[np.ndarray] | None:
    """Per tensor the scales ``(O / B, B)`` that turn ``tensors[0]`` (the base) into it, for the
    first block size B that reproduces every tensor; None when none does, when the scales would be
    as large as the tensor, or when the tensors are not float32 weights of one shape."""
    base = tensors[0]
    if base.ndim < 2 or base.dtype != np.float32 or any(t.shape != base.shape or t.dtype != base.dtype for t in tensors):
        return None
    for width in BLOCKS:
        view = blocked(base.shape, (base.shape[0] // width, width)) if base.shape[0] % width == 0 else None
        if view is None or view[1] == 1:  # one value per channel: scales would store no less than the tensor
            continue
        b = base.reshape(view).astype(np.float64)
        den = (b * b).sum(axis=1)
        scales = []
        for t in tensors:
            w = t.reshape(view).astype(np.float64)
            c = np.where(den > 0, (w * b).sum(axis=1) / np.where(den > 0, den, 1), 1.0).astype(np.float32)
            error = np.abs(b * c[:, None, :] - w).max(axis=1)
            if not (error <= TOLERANCE * np.abs(w).max(axis=1)).all():
                break
            scales.append(c)
        else:
            return scales
    return None


def apply(base: np.ndarray, scales: np.ndarray, out: np.ndarray) -> None:
    """``out = base * scales`` on the output channels, in place (``out`` has the base's shape)."""
    view = blocked(base.shape, scales.shape)
    np.multiply(base.reshape(view), scales[:, None, :], out=out.reshape(view))
