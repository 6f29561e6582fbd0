"""FTN: CP deltas are what the paper says (rank, params, attention views), fold exactly, and
survive a bundle round-trip and the shared-plus-delta form."""
from __future__ import annotations

import pytest
import torch

from pipeline.core.bundle import backbone_id, load_bundle, write_bundle
from pipeline.core.delta import CPPart, LowRank, cp_dense
from pipeline.core.fold import SharedPlusDelta, compare, merge
from pipeline.methods import build_method
from pipeline.methods.ftn import FtnConfig, adapters, cp_params
from pipeline.core.ledger import safetensors_payload


def _ftn(bb, seed=0, **cfg):
    method = build_method("ftn", FtnConfig(**cfg))
    model = bb.task_net(10, seed=seed)
    method.prepare(model)
    with torch.no_grad():  # a "trained" state: every trainable tensor moved
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return method, model.eval()


def test_cp_reconstruction_is_the_sum_of_outer_products():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(3, n, generator=g) for n in (4, 5, 6))
    expected = sum(torch.einsum("i,j,k->ijk", a[r], b[r], c[r]) for r in range(3))
    assert torch.allclose(cp_dense([a, b, c]), expected, atol=1e-6)


@pytest.mark.parametrize("rank", [1, 3])
def test_delta_has_the_configured_rank_and_the_papers_param_count(backbones, rank):
    bb, _ = backbones["tiny_convnet"]
    method, model = _ftn(bb, rank=rank)
    delta = method.task_delta(model, "t")
    layers = adapters(model)
    assert len(layers) == 8  # every Conv2d and Linear, depthwise included
    for path, layer, _ in layers:
        entry = delta.entries[path]
        assert isinstance(entry, LowRank)
        w = layer.parametrizations.weight.original
        dense = entry.dense(w)
        # rank of the delta unfolded along its output axis: R, not more
        assert torch.linalg.matrix_rank(dense.reshape(w.shape[0], -1)).item() == min(rank, *dense.reshape(w.shape[0], -1).shape)
        c_out, c_in, kh, kw = w.shape if w.dim() == 4 else (*w.shape, 1, 1)
        axes = tuple(n for n in (c_out, c_in, kh * kw) if n > 1)
        assert entry.params() == cp_params(axes, rank) == rank * sum(axes)
        if w.dim() == 4 and c_in > 1 and kh * kw > 1:  # a full kxk conv: R (k^2 + C_in + C_out)
            assert entry.params() == rank * (kh * kw + c_in + c_out)
    depthwise = [layer for _, layer, _ in layers if getattr(layer, "groups", 1) > 1]
    assert depthwise, "the tiny convnet has a depthwise conv"
    for layer in depthwise:  # per-group input axis of length 1: a rank-R (C_out x k^2) matrix
        k2 = layer.kernel_size[0] * layer.kernel_size[1]
        assert sum(f.numel() for f in layer.parametrizations.weight[0].factors) == rank * (layer.out_channels + k2)


def test_effnet_rank1_costs_under_one_percent_of_the_base(backbones):
    bb, _ = backbones["efficientnet_lite0"]
    method, model = _ftn(bb, rank=1)
    lowrank = method.task_delta(model, "t").by_kind()["lowrank"]
    base = sum(v.numel() for v in bb.features.state_dict().values() if v.is_floating_point())
    assert lowrank["entries"] == 49
    assert lowrank["params"] / base < 0.01


def test_initial_delta_is_small_and_scaled_by_alpha_over_rank(backbones):
    bb, _ = backbones["tiny_convnet"]
    torch.manual_seed(0)
    m1 = build_method("ftn", FtnConfig(rank=4, alpha=1.0, init="paper"))
    model = bb.task_net(10)
    m1.prepare(model)
    _, layer, a = adapters(model)[0]
    w = layer.parametrizations.weight.original
    unscaled = LowRank([CPPart(list(a.factors))]).dense(w)
    assert unscaled.abs().max() > 0
    assert torch.allclose(layer.weight - w, unscaled / 4, atol=1e-7)


def test_the_default_init_starts_at_the_pretrained_model_and_leaves_it_at_the_first_step(backbones, digits16):
    """A zero last factor per part (as LoRA's zero B): the adapted model is the base exactly, and
    the gradient reaches that factor, so the first step moves the weights."""
    bb, _ = backbones["tiny_convnet"]
    model, base = bb.task_net(10, seed=0), bb.task_net(10, seed=0)
    build_method("ftn", FtnConfig(rank=2)).prepare(model)
    x = digits16.test.inputs(8)
    model.eval(), base.eval()
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    layers = adapters(model)
    assert layers and all(not a.factors[-1].any() and a.factors[0].any() for _, _, a in layers)
    model.train()
    torch.nn.functional.cross_entropy(model(x), digits16.test.labels[:8]).backward()
    assert all(a.factors[-1].grad is not None and a.factors[-1].grad.abs().max() > 0 for _, _, a in layers)


@pytest.mark.parametrize("variant", ["qv", "o"])
def test_attention_variants_on_timms_fused_qkv(backbones, digits16, variant):
    bb, _ = backbones["tiny_vit"]
    method, model = _ftn(bb, attention=variant, layers=["*.attn.*"])
    delta = method.task_delta(model, "t")
    attn = bb.features.blocks[0].attn
    heads, dim = attn.num_heads, attn.proj.out_features
    head_dim = dim // heads
    qkv, proj = "features.blocks.0.attn.qkv", "features.blocks.0.attn.proj"
    merged = merge(bb.base_net(), delta)
    w_qkv = merged.features.blocks[0].attn.qkv.weight
    if variant == "qv":
        assert proj not in delta.entries and qkv in delta.entries
        parts = delta.entries[qkv].parts
        assert [p.rows for p in parts] == [(0, dim), (2 * dim, 3 * dim)]
        assert [tuple(f.shape[1] for f in p.factors) for p in parts] == [(heads, head_dim, dim)] * 2
        # keys untouched, queries and values changed
        assert torch.equal(w_qkv[dim:2 * dim], attn.qkv.weight[dim:2 * dim])
        assert not torch.equal(w_qkv[:dim], attn.qkv.weight[:dim])
        assert not torch.equal(w_qkv[2 * dim:], attn.qkv.weight[2 * dim:])
    else:
        assert qkv not in delta.entries and proj in delta.entries
        (part,) = delta.entries[proj].parts
        assert tuple(f.shape[1] for f in part.factors) == (dim, heads, head_dim)
        assert torch.equal(w_qkv, attn.qkv.weight)
    # the paper's variants adapt attention only
    assert all(".attn." in p for p, d in delta.entries.items() if d.kind == "lowrank")
    x = digits16.test.inputs()
    check = compare(model, merged, x)
    assert check["max_abs_diff"] < 1e-5 and check["argmax_agree"] == 1.0


def test_rank_overrides_and_layer_patterns(backbones):
    bb, _ = backbones["tiny_convnet"]
    cfg = {"rank": 2, "rank_overrides": {"features.blocks.0.*": 5, "features.proj": 0}}
    method, model = _ftn(bb, **cfg)
    ranks = {p: a.factors[0].shape[0] for p, _, a in adapters(model)}
    assert "features.proj" not in ranks
    assert all(r == 5 for p, r in ranks.items() if p.startswith("features.blocks.0."))
    assert all(r == 2 for p, r in ranks.items() if not p.startswith("features.blocks.0."))


def test_bundle_round_trip_and_ledger(tmp_path, backbones, digits16):
    bb, _ = backbones["tiny_vit"]
    deltas, models = [], {}
    for i, t in enumerate(("a", "b")):
        method, model = _ftn(bb, seed=i, rank=2)
        deltas.append(method.task_delta(model, t))
        models[t] = model
    manifest = write_bundle(tmp_path / "b", bb, backbone_id(bb, "none", 16), deltas, {"name": "ftn"},
                            {"a": 10, "b": 10})
    bundle = load_bundle(tmp_path / "b")
    x = digits16.test.inputs()
    for d in deltas:
        _, payload = safetensors_payload(tmp_path / "b" / "tasks" / f"{d.task}.safetensors")
        assert payload * 8 == manifest["ledger"]["tasks"][d.task]["bits"] == d.bits()
        loaded = bundle.delta(d.task)
        for path, entry in d.entries.items():
            if entry.kind == "lowrank":
                assert [p.rows for p in loaded.entries[path].parts] == [p.rows for p in entry.parts]
        check = compare(models[d.task], bundle.merged(d.task), x)
        assert check["max_abs_diff"] < 1e-5
    # low-rank entries do not make the base weight unnecessary; only the task norms replace base tensors
    norms = deltas[0].by_kind()["norm"]["params"]
    assert manifest["ledger"]["base"]["params_in_use"] == manifest["ledger"]["base"]["params"] - norms


@pytest.mark.parametrize("bb_name", ["tiny_convnet", "tiny_vit"])
def test_shared_plus_delta_equals_merged_without_dense_copies(backbones, digits16, bb_name):
    bb, _ = backbones[bb_name]
    deltas = []
    for i, (t, name) in enumerate((("a", "ftn"), ("b", "ftn"), ("c", "norm_head"))):
        method = build_method(name)
        model = bb.task_net(10, seed=i)
        method.prepare(model)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
        deltas.append(method.task_delta(model, t))
    base = bb.base_net()
    shared = SharedPlusDelta(base, deltas)
    x = digits16.test.inputs()
    with torch.no_grad():
        for d in deltas:
            expected = merge(base, d)(x)
            assert torch.allclose(shared(x, d.task), expected, atol=1e-5), d.task
    values = shared.stored_values()
    assert values["base"] == sum(v.numel() for v in base.state_dict().values() if v.is_floating_point())
    for d in deltas:
        assert values[d.task] == d.params()
    # the base module is still the shared one, unchanged by running tasks
    for k, v in bb.features.state_dict().items():
        assert torch.equal(base.features.state_dict()[k], v)
    with pytest.raises(KeyError, match="no task 'zzz'"):
        shared(x, "zzz")


def test_frozen_norms_option_keeps_the_base_statistics(backbones, digits16):
    bb, _ = backbones["tiny_convnet"]
    method = build_method("ftn", FtnConfig(task_norms=False))
    model = bb.task_net(10)
    method.prepare(model)
    method.train_mode(model)
    x, _ = next(digits16.train.batches(16))
    model(x)  # a train-mode forward: BN statistics must not move
    for k, v in bb.features.state_dict().items():
        if "running" in k:
            assert torch.equal(model.features.state_dict()[k], v), k
    delta = method.task_delta(model, "t")
    assert {d.kind for d in delta.entries.values()} == {"lowrank", "head"}
