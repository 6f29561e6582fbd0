"""Every method on every tiny backbone: trains only its own parameters, folds exactly."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from pipeline.core.fold import compare, merge
from pipeline.methods import REGISTRY, build_method
from pipeline.training.incremental import task_context
from pipeline.methods.taps import TapsConfig, gates
from pipeline.methods.context import Schedule

# every registered method that trains one task at a time joins this table by registering
METHODS = [name for name, m in REGISTRY.items() if m.trainer != "joint"]


def _train_steps(model, method, data, bb, steps=3, lr=0.05, epoch=0):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    method.start_epoch(model, epoch)
    method.train_mode(model)
    for i, (x, y) in enumerate(data.train.batches(32)):
        loss = F.cross_entropy(model(x), y)
        reg = method.regulariser(model, epoch=0)
        if reg is not None:
            loss = loss + reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i + 1 == steps:
            break


def test_registry_has_the_spine_methods():
    spine = {"finetune", "linear_probe", "norm_head", "taps", "ftn", "cwps", "joint_finetune", "joint_taps", "adashare"}
    assert spine <= set(REGISTRY)
    assert {"finetune", "taps", "ftn", "cwps"} <= set(METHODS)


@pytest.mark.parametrize("bb_name", ["tiny_convnet", "tiny_vit", "efficientnet_lite0"])
@pytest.mark.parametrize("method_name", METHODS)
def test_train_then_fold_is_exact(backbones, digits16, digits32, bb_name, method_name):
    bb, size = backbones[bb_name]
    data = digits16 if size == 16 else digits32
    params = TapsConfig(lam=1.0, score_init=0.15, tau=0.1) if method_name == "taps" else None
    method = build_method(method_name, params)
    schedule = Schedule(epochs=2, batch_size=32, lr=0.05)
    method.setup(task_context(bb, data, schedule, seed=0))  # CWPS searches on the task's data here
    model = bb.task_net(data.num_classes, seed=0)
    base_before = {k: v.clone() for k, v in bb.features.state_dict().items()}
    method.prepare(model)
    _train_steps(model, method, data, bb, epoch=schedule.epochs - 1)  # the last epoch: CWPS's hard mask

    # only adapter parameters received gradients
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
    if method_name not in ("finetune", "cwps"):  # CWPS trains a full child next to its frozen parent
        frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen, "a parameter-efficient method must leave shared weights frozen"
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if method_name in ("linear_probe", "norm_head"):
            assert trainable < sum(p.numel() for p in frozen.values())
    # the shared backbone object is never touched by training a task copy
    for k, v in bb.features.state_dict().items():
        assert torch.equal(v, base_before[k]), k

    delta = method.task_delta(model, "digits")
    base = bb.base_net()
    merged = merge(base, delta)
    x = data.test.inputs()
    check = compare(model, merged, x)
    assert check["max_abs_diff"] < 1e-5, check
    assert check["argmax_agree"] == 1.0
    # the merged model is plain: no adapter code left anywhere
    assert not any(hasattr(m, "parametrizations") for m in merged.modules())
    assert type(merged.features) is type(bb.features)
    # and merging never changed the base
    for k, v in bb.features.state_dict().items():
        assert torch.equal(v, base_before[k]), k


def test_linear_probe_keeps_base_norm_statistics(backbones, digits16):
    bb, _ = backbones["tiny_convnet"]
    method = build_method("linear_probe")
    model = bb.task_net(10)
    method.prepare(model)
    _train_steps(model, method, digits16, bb)
    for (n, a), b in zip(model.features.state_dict().items(), bb.features.state_dict().values()):
        assert torch.equal(a, b), f"{n} changed under linear probe"
    assert set(method.task_delta(model, "t").entries) == {"head"}


def test_taps_straight_through_gradient_and_storage(backbones, digits16):
    bb, _ = backbones["tiny_convnet"]
    method = build_method("taps", TapsConfig(lam=0.0))
    model = bb.task_net(10)
    method.prepare(model)
    layers = gates(model)
    assert len(layers) == 8  # stem, 2 blocks x (pw, depthwise, pwl), proj: every Conv2d and Linear
    # make the deltas non-zero so the score gradient is informative
    with torch.no_grad():
        for _, _, g in layers:
            g.delta.normal_(0, 0.01)
    x, y = next(digits16.train.batches(16))
    model.train()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    for path, layer, g in layers:
        # d loss / d s == <d loss / d w, dw>  (straight-through: the backward of s * dw);
        # d loss / d w is what dw received, since w = w_base + gate * dw with gate == 1
        expected = (g.delta.grad * g.delta).sum()
        assert torch.allclose(g.score.grad, expected, rtol=1e-4, atol=1e-7), path
        assert layer.parametrizations.weight.original.grad is None

    # switch one layer off: its weight is exactly the base and it is not stored
    off_path, off_layer, off_gate = layers[1]
    with torch.no_grad():
        off_gate.score.fill_(0.05)
    base_w = off_layer.parametrizations.weight.original
    assert torch.equal(off_layer.weight, base_w)
    delta = method.task_delta(model, "t")
    assert off_path not in delta.entries
    assert all(p in delta.entries for p, _, g in layers if g.is_on())
    assert delta.gate_bits == len(layers)
    assert delta.by_kind()["gate"]["bits"] == len(layers)


def test_taps_l1_term_follows_the_paper(backbones):
    bb, _ = backbones["tiny_convnet"]
    method = build_method("taps", TapsConfig(lam=0.3, l1_warmup_epochs=2))
    model = bb.task_net(10)
    method.prepare(model)
    scores = torch.tensor([g.score.item() for _, _, g in gates(model)])
    assert method.regulariser(model, epoch=1) is None  # still warming up
    reg = method.regulariser(model, epoch=2)
    assert reg.item() == pytest.approx(0.3 / len(scores) * scores.abs().sum().item())


def test_finetune_stores_everything_including_non_module_tensors(backbones):
    bb, _ = backbones["tiny_vit"]
    method = build_method("finetune")
    model = bb.task_net(10)
    method.prepare(model)
    with torch.no_grad():
        model.features.pos_embed.add_(1.0)
    delta = method.task_delta(model, "t")
    stored = sum(d.params() for p, d in delta.entries.items() if p != "head")
    assert stored == sum(v.numel() for v in bb.features.state_dict().values() if v.is_floating_point())
    merged = merge(bb.base_net(), delta)
    assert torch.equal(merged.features.pos_embed, model.features.pos_embed)
    assert not torch.equal(merged.features.pos_embed, bb.features.pos_embed)
