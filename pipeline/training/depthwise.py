"""A faster CPU weight gradient for depthwise convs whose kernel is larger than their input.

PyTorch's CPU kernel for a depthwise conv's weight gradient is slow when the kernel reaches
past the input on a side (its dilated extent wider or taller than the input): EfficientNet's
late blocks at 64 px (4x4 and 2x2 maps, 5x5 kernels, 480-1152 channels) took 25-44 ms each
for a batch of 64 on one thread, against 0.2-0.7 ms for the same conv's forward. Summing, per
kernel tap, the product of the input and the output gradient where that tap sees the input
takes 0.8-3.4 ms there (this machine, torch 2.14); where the input is larger than the kernel,
PyTorch's own kernel is the faster one and is kept (480 channels at 14x14, 5x5: 48 against
98 ms). Per training step of EfficientNet-Lite0 (64 px, batch 64, one thread, interleaved in
one run of ``benchmarks/train_step.py --torch-kernels``): fine-tune 0.58x, TAPS 0.62x, FTN
0.58x, CWPS 0.59x the time with PyTorch's kernel alone.

``depthwise_kernels()`` is a ``TorchFunctionMode`` that routes such ``conv2d`` calls (CPU,
float32, a weight that needs a gradient, one filter per input channel) to ``DepthwiseConv2d``,
whose forward and input gradient are PyTorch's own; every other call passes through unchanged.
The gradients agree with PyTorch's to float rounding (``tests/test_depthwise.py``). A mode sees
every op of the forward (2-10 ms a step here), so the trainer enters it only for a model with
depthwise weights to train (``trains_depthwise``): not for a linear probe or norms and head.
What the trainer does not need, the routed convs do not do: a second derivative
(``create_graph``) or ``torch.func`` transforms through them raise PyTorch's error."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

_ARGS = ("bias", "stride", "padding", "dilation", "groups")


def _pair(v) -> tuple[int, int]:
    """``conv2d``'s int, 1- or 2-sequence for (height, width)."""
    if isinstance(v, int):
        return v, v
    v = tuple(int(n) for n in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _overlap(n_in: int, n_out: int, tap: int, stride: int, pad: int, dilation: int) -> tuple[slice, slice] | None:
    """(input slice, output slice) along one axis where kernel tap ``tap`` sees the input (not
    the padding): output o reads input ``o * stride - pad + tap * dilation``; None if nowhere."""
    off = tap * dilation - pad
    lo = max(0, -(off // stride))  # the first o with o * stride + off >= 0
    hi = min(n_out - 1, (n_in - 1 - off) // stride)
    if lo > hi:
        return None
    return slice(lo * stride + off, hi * stride + off + 1, stride), slice(lo, hi + 1)


def depthwise_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """d loss / d ``weight`` of a depthwise conv (``(C, 1, kh, kw)``): per tap (i, j), the
    output gradient times the input seen through that tap, summed over batch and positions.
    Only where the tap sees the input: no padded copy, and a tap that sees only padding is 0."""
    out = torch.zeros_like(weight)  # its layout too: DDP's buckets expect the parameter's strides
    (h, w), (ho, wo) = x.shape[2:], grad_out.shape[2:]
    for i in range(weight.shape[2]):
        rows = _overlap(h, ho, i, stride[0], padding[0], dilation[0])
        for j in range(weight.shape[3]):
            cols = _overlap(w, wo, j, stride[1], padding[1], dilation[1])
            if rows is not None and cols is not None:
                seen = x[:, :, rows[0], cols[0]]
                out[:, 0, i, j] = (seen * grad_out[:, :, rows[1], cols[1]]).sum((0, 2, 3))
    return out


class DepthwiseConv2d(torch.autograd.Function):
    """``F.conv2d`` of a depthwise conv; the weight gradient from ``depthwise_weight_grad``."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation)
        return F.conv2d(x, weight, bias, stride, padding, dilation, weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        # in the input's layout: PyTorch's input gradient took 2-8x as long with the two mismatched
        grad_out = grad_out.contiguous(memory_format=torch.channels_last) \
            if x.is_contiguous(memory_format=torch.channels_last) else grad_out.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0],
                weight.shape[0], [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = depthwise_weight_grad(grad_out, x, weight, stride, padding, dilation)
        if ctx.needs_input_grad[2]:  # False without a bias
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None


def routed(x: torch.Tensor, weight: torch.Tensor, padding, dilation, groups: int) -> bool:
    """Whether a ``conv2d`` call goes to ``DepthwiseConv2d``: a CPU float32 depthwise conv (one
    filter per input channel) whose weight needs a gradient and whose kernel, dilated, is taller
    or wider than its input."""
    if isinstance(padding, str) or not torch.is_grad_enabled() or not weight.requires_grad:
        return False
    if x.dim() != 4 or weight.dim() != 4 or x.device.type != "cpu" or x.dtype != torch.float32 \
            or weight.dtype != torch.float32:
        return False
    if not (groups > 1 and weight.shape[1] == 1 and weight.shape[0] == groups == x.shape[1]):
        return False
    dilation = _pair(dilation)
    return dilation[0] * (weight.shape[2] - 1) + 1 > x.shape[2] or dilation[1] * (weight.shape[3] - 1) + 1 > x.shape[3]


def trains_depthwise(model: nn.Module) -> bool:
    """Whether some depthwise ``Conv2d`` of ``model`` has a weight that trains: a parameter of
    its own or of its weight's parametrisation (TAPS, CWPS, FTN) that needs a gradient."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels:
            held = m.parametrizations.weight.parameters() if parametrize.is_parametrized(m, "weight") else [m.weight]
            if any(p.requires_grad for p in held):
                return True
    return False


class depthwise_kernels(TorchFunctionMode):
    """Within it, ``conv2d`` calls that ``routed`` accepts run as ``DepthwiseConv2d``. For a
    float32 CPU forward; under autocast the call's dtype is decided below this level, so the
    trainer enters it only for fp32 on a CPU (``Runtime.compute``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d and len(args) >= 2:
            opts = dict(zip(_ARGS, args[2:])) | kwargs
            x, weight = args[0], args[1]
            if routed(x, weight, opts.get("padding", 0), opts.get("dilation", 1), opts.get("groups", 1)):
                return DepthwiseConv2d.apply(x, weight, opts.get("bias"), _pair(opts.get("stride", 1)),
                                             _pair(opts.get("padding", 0)), _pair(opts.get("dilation", 1)))
        return func(*args, **kwargs)
