"""The CPU depthwise kernel of training (``pipeline.training.depthwise``): its gradients are
PyTorch's own to float rounding, and it is used exactly where it is meant to be."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from pipeline.core.backbones import build_backbone
from pipeline.training.depthwise import DepthwiseConv2d, depthwise_kernels
from pipeline.training.runtime import Runtime


def _grads(fn, x, w, b):
    x, w = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    b = None if b is None else b.detach().clone().requires_grad_(True)
    y = fn(x, w, b)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * g).sum().backward()
    return y, x.grad, w.grad, None if b is None else b.grad


CASES = [  # (N, C, H, W), kernel, stride, padding, dilation
    ((2, 6, 4, 4), (5, 5), (1, 1), (2, 2), (1, 1)),
    ((3, 5, 2, 3), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((2, 4, 7, 5), (3, 5), (2, 1), (1, 2), (1, 1)),
    ((1, 8, 9, 9), (3, 3), (2, 2), (0, 0), (1, 1)),
    ((2, 3, 6, 6), (3, 3), (1, 1), (2, 2), (2, 2)),
    ((2, 4, 5, 8), (5, 5), (2, 2), (2, 2), (1, 1)),
    ((2, 4, 2, 2), (5, 5), (1, 1), (2, 2), (1, 1)),  # the corner taps see only padding
    ((2, 3, 2, 3), (3, 3), (2, 1), (3, 2), (1, 1)),  # padding wider than the kernel
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("shape,kernel,stride,padding,dilation", CASES)
def test_gradients_match_torch(shape, kernel, stride, padding, dilation, channels_last, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w = torch.randn((c, 1, *kernel), generator=gen)
    b = torch.randn(c, generator=gen) if bias else None
    ref = _grads(lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation, c), x, w, b)
    got = _grads(lambda x, w, b: DepthwiseConv2d.apply(x, w, b, stride, padding, dilation), x, w, b)
    for name, r, g in zip(("output", "input grad", "weight grad", "bias grad"), ref, got):
        if r is None:
            assert g is None
            continue
        assert g.shape == r.shape, name
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=name)


def _backward_name(x, w, **kw) -> str:
    with depthwise_kernels():
        y = F.conv2d(x, w, **kw)
    return type(y.grad_fn).__name__ if y.grad_fn is not None else "none"


def test_routes_only_small_depthwise_convs_that_train():
    w = torch.randn(8, 1, 5, 5, requires_grad=True)
    small, large = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 12, 12)
    assert "DepthwiseConv2d" in _backward_name(small, w, padding=2, groups=8)
    assert "DepthwiseConv2d" in _backward_name(small, w, padding=2, groups=8, bias=torch.zeros(8))
    assert "DepthwiseConv2d" in _backward_name(torch.randn(2, 8, 12, 4), w, padding=2, groups=8)  # narrow
    assert "DepthwiseConv2d" not in _backward_name(large, w, padding=2, groups=8)  # PyTorch's is faster there
    assert "DepthwiseConv2d" not in _backward_name(small, w, padding="same", groups=8)
    assert "DepthwiseConv2d" not in _backward_name(small, w.detach(), padding=2, groups=8)  # no weight gradient
    dense = torch.randn(8, 8, 5, 5, requires_grad=True)
    assert "DepthwiseConv2d" not in _backward_name(small, dense, padding=2)
    with torch.no_grad():
        assert _backward_name(small, w, padding=2, groups=8) == "none"
    assert "DepthwiseConv2d" not in _backward_name(small.double(), w.detach().double().requires_grad_(), padding=2,
                                                   groups=8)


class _Net(nn.Module):
    """A depthwise conv on a 3x3 map with a 5x5 kernel (routed) between two dense ones."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(6, 6, 5, padding=2, groups=6)
        self.b = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.b(F.relu(self.dw(F.relu(self.a(x))))).mean((2, 3))


def _trained(context, steps: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = _Net().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 3])
    for _ in range(steps):
        with context(net):
            loss = F.cross_entropy(net(x.contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in net.state_dict().items()}


def test_training_under_the_runtime_matches_plain_torch():
    plain = _trained(lambda net: contextlib.nullcontext())
    routed = _trained(Runtime().compute)
    for k in plain:
        torch.testing.assert_close(routed[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)
    net = _Net()
    with Runtime().compute(net):  # and the run really went through the kernel
        y = net.dw(torch.randn(2, 6, 3, 3))
    assert "DepthwiseConv2d" in type(y.grad_fn).__name__


def _kernel_used(runtime: Runtime, net: nn.Module) -> bool:
    with runtime.compute(net):
        y = F.conv2d(torch.randn(2, 6, 3, 3), torch.randn(6, 1, 5, 5, requires_grad=True), padding=2, groups=6)
    return "DepthwiseConv2d" in type(y.grad_fn).__name__


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.ones(()))

    def forward(self, w):
        return w * self.s


def test_entered_only_where_it_can_help():
    net = _Net()
    assert _kernel_used(Runtime(), net)
    assert not _kernel_used(Runtime(precision="bf16"), net)  # autocast decides dtypes below the mode
    assert not _kernel_used(Runtime(depthwise_kernels=False), net)
    net.dw.weight.requires_grad_(False)  # a linear probe, norms and head: no mode and its overhead
    assert not _kernel_used(Runtime(), net)
    parametrize.register_parametrization(net.dw, "weight", _Scaled())  # TAPS, CWPS, FTN: a trained parametrisation
    net.dw.parametrizations.weight.original.requires_grad_(False)
    assert _kernel_used(Runtime(), net)
    net.dw.parametrizations.weight[0].s.requires_grad_(False)
    assert not _kernel_used(Runtime(), net)


def test_conv2d_argument_forms():
    """One-element sequences for stride, padding and dilation, as ``F.conv2d`` takes them."""
    x = torch.randn(2, 4, 3, 3)
    dense = torch.randn(8, 4, 3, 3, requires_grad=True)
    with depthwise_kernels():
        y = F.conv2d(x, dense, None, 1, 1, (1,))
    torch.testing.assert_close(y, F.conv2d(x, dense, None, 1, 1, 1))
    w = torch.randn(4, 1, 5, 5)
    ref = _grads(lambda x, w, b: F.conv2d(x, w, b, 1, 2, 1, 4), x, w, None)
    with depthwise_kernels():
        got = _grads(lambda x, w, b: F.conv2d(x, w, b, [1], [2], [1], 4), x, w, None)
        assert "DepthwiseConv2d" in _backward_name(x, w.requires_grad_(), stride=[1], padding=(2,), groups=4)
    for r, g in zip(ref[:3], got[:3]):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_weight_gradient_in_the_parameters_layout():
    """DDP's gradient buckets expect a gradient with its parameter's strides."""
    w = torch.randn(6, 1, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    x = torch.randn(2, 6, 3, 3).contiguous(memory_format=torch.channels_last)
    with depthwise_kernels():
        y = F.conv2d(x, w, padding=2, groups=6)
    y.sum().backward()
    assert "DepthwiseConv2d" in type(y.grad_fn).__name__
    assert w.grad.stride() == w.stride()


def test_the_tiny_convnet_routes_with_5x5_kernels_at_8_px():
    """tests/test_scale.py's two-rank and resume tests run there, so they cover the kernel."""
    from tests.test_scale import ROUTED

    net = build_backbone(ROUTED["name"], "none", ROUTED["kwargs"]).task_net(3)
    names = []
    net.features.blocks[0].conv_dw.register_forward_hook(lambda m, i, o: names.append(type(o.grad_fn).__name__))
    with Runtime().compute(net):
        net(torch.randn(2, 3, ROUTED["image_size"], ROUTED["image_size"]))
    assert "DepthwiseConv2d" in names[0]
