"""Which blocks of a backbone a task may skip (AdaShare's select-or-skip decisions).

A block can be skipped when removing it leaves a working network: it is a residual block
``y = x + f(x)`` whose output has its input's shape. We find these without knowing the
architecture: every element of a ``Sequential``/``ModuleList`` (the way timm, torchvision
and our tiny models list their blocks) is run on the input it sees in a real forward
pass, once as is and once with all its weights and statistics zeroed. Zeroing kills
``f`` (convolutions, attention, MLPs and norms all give 0), so a block whose zeroed copy
returns its input unchanged is ``x + f(x)``; a plain conv stack returns 0 instead.
This finds EfficientNet's inverted residuals with a skip, ResNet blocks without
downsampling and ViT blocks, and leaves stems, downsampling blocks and heads alone.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

CONTAINERS = (nn.Sequential, nn.ModuleList)


def _candidates(features: nn.Module) -> dict[str, nn.Module]:
    """Non-container elements of every container, with parameters, by path."""
    out = {}
    for path, module in features.named_modules():
        if isinstance(module, CONTAINERS):
            for name, child in module.named_children():
                if not isinstance(child, CONTAINERS) and any(True for _ in child.parameters()):
                    out[f"{path}.{name}" if path else name] = child
    return out


@torch.no_grad()
def _zeroed(module: nn.Module) -> nn.Module:
    clone = copy.deepcopy(module).eval()
    for t in list(clone.parameters()) + list(clone.buffers()):
        if t.is_floating_point():
            t.zero_()
    return clone


@torch.no_grad()
def skippable_blocks(features: nn.Module, image_size: int) -> list[str]:
    """Paths (relative to ``features``) of its residual blocks with matching input and output
    shapes, in the order the forward pass runs them; nested matches keep the outermost."""
    model = copy.deepcopy(features).eval()
    candidates = _candidates(model)
    started: list[str] = []  # the order blocks start in (an outer block finishes after its inner ones)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for path, module in candidates.items():
        def pre(mod, args, path=path):
            if path not in started:
                started.append(path)

        def hook(mod, args, output, path=path):
            if path not in seen and len(args) == 1 and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                seen[path] = (args[0], output)
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(hook)]
    try:
        model(torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)))
    finally:
        for h in handles:
            h.remove()
    residual = set()
    for path, (x, y) in seen.items():
        if x.shape == y.shape:
            out = _zeroed(candidates[path])(x)
            if isinstance(out, torch.Tensor) and out.shape == x.shape and torch.allclose(out, x, atol=1e-5, rtol=1e-5):
                residual.add(path)
    return [p for p in started if p in residual and not any(p.startswith(f"{q}.") for q in residual)]
