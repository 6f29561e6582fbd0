"""Per-group optimiser settings: which layer wins, what an lr means, warm-up and clipping."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError, parse_config
from pipeline.core.backbones import TaskNet
from pipeline.methods.base import GroupOptions, IncrementalMethod
from pipeline.methods.context import Schedule
from pipeline.methods.taps.gate import TapsConfig, l1_penalty
from pipeline.training import optim


class TwoGroups(IncrementalMethod):
    """A method whose defaults set the factors to Adam and the norms to a scaled SGD."""

    name = "two_groups"

    def group_options(self):
        return {"factors": GroupOptions(optimizer="adam", lr=1e-2, warmup_epochs=1),
                "norms": GroupOptions(lr_scale=0.5)}


def net() -> TaskNet:
    """One bias-free 1x1 conv (the body) and a head."""
    return TaskNet(nn.Sequential(nn.Conv2d(3, 1, 1, bias=False), nn.Flatten()), nn.Linear(1, 2))


def schedule(**kw) -> Schedule:
    return Schedule(epochs=4, batch_size=8, lr=0.1, head_lr_scale=10, **kw)


def test_layers_apply_in_order_library_method_run_entry():
    got = optim.resolve(TwoGroups(), schedule(
        run_groups={"factors": GroupOptions(lr=3e-3), "body": GroupOptions(weight_decay=1e-4)},
        groups={"factors": GroupOptions(clip=1.0), "body": GroupOptions(momentum=0.5)}))
    assert got["head"].optimizer == optim.HEAD.optimizer and got["head"].lr == optim.HEAD.lr
    assert (got["factors"].optimizer, got["factors"].lr, got["factors"].warmup_epochs, got["factors"].clip) == \
        ("adam", 3e-3, 1, 1.0)
    assert (got["body"].optimizer, got["body"].weight_decay, got["body"].momentum) == ("sgd", 1e-4, 0.5)
    assert got["norms"].lr is None and got["norms"].lr_scale == 0.5


def test_another_optimiser_without_an_lr_falls_back_to_the_scaled_entry_lr():
    got = optim.resolve(TwoGroups(), schedule(groups={"head": GroupOptions(optimizer="sgd"),
                                                      "factors": GroupOptions(optimizer="sgd", lr_scale=2)}))
    assert got["head"].optimizer == "sgd" and got["head"].lr is None and got["head"].lr_scale == 10
    assert got["factors"].lr is None and got["factors"].lr_scale == 2
    model = net()
    model.head.requires_grad_(False)
    opts = optim.build(TwoGroups(), model, schedule(groups={"body": GroupOptions(optimizer="adam")}), 4)
    (opt,) = opts.by_phase["weights"]
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["initial_lr"] == pytest.approx(0.1)


def test_warmup_ramps_then_the_cosine_decays():
    warm, total = 4, 16
    lrs = [optim.factor(s, total, warm) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(0.25 * 0.5 * (1 + math.cos(0)))
    assert lrs[3] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 16)))
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] == pytest.approx(0)
    assert optim.factor(0, total, 0) == pytest.approx(1.0)


def test_a_group_with_clip_steps_with_its_clipped_gradient():
    model = net()
    model.head.requires_grad_(False)
    layer = model.features[0]
    nn.init.zeros_(layer.weight)
    opts = optim.build(TwoGroups(), model, schedule(groups={"body": GroupOptions(lr=1.0, momentum=0.0, clip=0.5)}), 1)
    layer.weight.grad = torch.tensor([[30.0, 40.0, 0.0]]).reshape(1, 3, 1, 1)  # norm 50
    opts.step("weights")
    assert torch.linalg.vector_norm(layer.weight.detach()).item() == pytest.approx(0.5, rel=1e-5)


def test_run_wide_optim_is_validated_by_group_name():
    base = {"tasks": [{"name": "a", "source": {"type": "digits"}}], "methods": ["linear_probe"],
            "backbone": {"name": "tiny_convnet", "weights": "none"}}
    cfg = parse_config(base | {"train": {"optim": {"head": {"optimizer": "sgd"}}}})
    assert cfg.train.optim["head"].optimizer == "sgd"
    with pytest.raises(ConfigError, match=r"train\.optim.*unknown parameter group.*'scores'"):
        parse_config(base | {"train": {"optim": {"scores": {"lr": 0.1}}}})
    with pytest.raises(ConfigError, match=r"train\.optim\.head\.optimizer"):
        parse_config(base | {"train": {"optim": {"head": {"optimizer": "lamb"}}}})


def test_taps_params_penalty_prices_each_layer_by_its_size():
    scores = torch.tensor([0.2, 0.2, 0.2])
    sizes = [10, 10, 80]
    uniform = l1_penalty(TapsConfig(lam=3.0), scores, sizes, epoch=5)
    assert uniform.item() == pytest.approx(3.0 / 3 * 0.6)
    priced = l1_penalty(TapsConfig(lam=3.0, penalty="params"), scores.requires_grad_(), sizes, epoch=5)
    priced.backward()
    assert priced.item() == pytest.approx(uniform.item())  # the same total weight, spread by size
    assert scores.grad.tolist() == pytest.approx([3.0 / 3 * 3 * n / 100 for n in sizes])
    assert l1_penalty(TapsConfig(lam=3.0, l1_warmup_epochs=2), scores, sizes, epoch=1) is None
