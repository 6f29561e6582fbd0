"""The LoRA baseline: what PEFT computes, folded into the existing low-rank kind."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.backbones import build_backbone
from pipeline.core.fold import compare, merge
from pipeline.methods import build_method
from pipeline.methods.lora import LoraConfig, adapters


def _batch(n=8, size=16):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_lora_matches_peft_after_one_step():
    peft = pytest.importorskip("peft", reason="HF PEFT is a test-only dependency (pip install taskfold[test])")
    bb = build_backbone("tiny_convnet", "none")
    ours = bb.task_net(10)
    method = build_method("lora", LoraConfig(rank=2, alpha=4.0))
    method.prepare(ours)
    theirs = copy.deepcopy(bb.task_net(10))
    targets = [p for p, _, _ in adapters(ours)]
    cfg = peft.LoraConfig(r=2, lora_alpha=4.0, lora_dropout=0.0, target_modules=[t for t in targets])
    theirs = peft.get_peft_model(theirs, cfg)
    # the same initial factors: PEFT's A (random) into ours, B is zero in both
    for path, layer, a in adapters(ours):
        lora_layer = theirs.base_model.model.get_submodule(path)
        with torch.no_grad():
            a.A.copy_(lora_layer.lora_A["default"].weight.reshape(a.A.shape))
            assert torch.equal(lora_layer.lora_B["default"].weight.reshape(a.B.shape), a.B)
    x, y = _batch()
    for model in (ours, theirs):
        params = [p for n, p in model.named_parameters() if "lora_" in n or n.endswith((".A", ".B"))]
        keep = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        opt = torch.optim.SGD(params, lr=0.5)
        model.train()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert len(targets) == 6  # stem, the blocks' two 1x1 convs each, proj: not the depthwise convs
    assert method.skipped == ["features.blocks.0.conv_dw", "features.blocks.1.conv_dw"]
    for path, layer, a in adapters(ours):
        got = a.delta(layer.parametrizations.weight.original)
        want = theirs.base_model.model.get_submodule(path).get_delta_weight("default")
        assert got.abs().max() > 0, path  # the step moved B
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), (path, (got - want).abs().max())


def test_lora_folds_into_lowrank_and_runs_as_a_side_branch():
    bb = build_backbone("tiny_convnet", "none")
    model = bb.task_net(10)
    method = build_method("lora", LoraConfig(rank=3))
    method.prepare(model)
    with torch.no_grad():
        for _, _, a in adapters(model):
            a.B.normal_(0, 0.1)  # a trained state
    delta = method.task_delta(model, "t")
    x, _ = _batch()
    merged = merge(bb.base_net(), delta)
    assert compare(model, merged, x)["max_abs_diff"] < 1e-5
    branched = merge(bb.base_net(), delta, branches=True)
    assert compare(model, branched, x)["max_abs_diff"] < 1e-5
    assert sum(isinstance(m, nn.Module) and type(m).__name__ == "LowRankBranch" for m in branched.modules()) == 6
    lowrank = [e for p, e in delta.entries.items() if e.kind == "lowrank"]
    assert len(lowrank) == 6 and all(len(e.parts[0].factors) == 2 for e in lowrank)


def test_the_report_compares_every_entry_with_lora_on_both_axes():
    from pipeline.report.markdown import baseline_table

    def m(method, n, acc):
        return {"method": method, "n_x_base": n, "mean_test_acc": acc}

    res = {"methods": {"lora": m("lora", 1.3, 0.8185), "taps": m("taps", 1.857, 0.805), "ftn": m("ftn", 1.09, 0.8425),
                       "probe": m("linear_probe", 1.015, 0.746), "ft": m("finetune", 4.0, 0.83)}}
    rows = {line.split(" | ")[0].strip("| "): line for line in baseline_table(res)[2:]}
    assert "**below**" in rows["taps"]  # more storage and less accurate: LoRA dominates it
    assert "above" in rows["ftn"]  # less storage, more accurate
    assert "less storage, less accuracy" in rows["probe"] and "more storage, more accuracy" in rows["ft"]
    assert baseline_table({"methods": {"ftn": m("ftn", 1.09, 0.8)}}) == []  # no LoRA entry, no table
