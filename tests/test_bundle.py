"""Bundle round-trip, ledger == bytes on disk, and clear errors for bad bundles."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.core.backbones import build_backbone
from pipeline.core.bundle import BundleError, backbone_id, load_bundle, write_bundle
from pipeline.core.delta import tensor_bits
from pipeline.core.fold import compare, merge
from pipeline.methods import build_method
from pipeline.methods.taps import TapsConfig, gates
from pipeline.core.ledger import safetensors_payload


def _deltas(bb, method_name, params=None, tasks=("a", "b")):
    out, models = [], {}
    for i, t in enumerate(tasks):
        method = build_method(method_name, params)
        model = bb.task_net(10, seed=i)
        method.prepare(model)
        with torch.no_grad():  # a deterministic "trained" state: every trainable tensor moved
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.01)
            if method_name == "taps":
                for _, _, g in gates(model)[::2]:
                    g.score.fill_(0.0)  # every other layer gated off
        out.append(method.task_delta(model, t))
        models[t] = model
    return out, models


@pytest.fixture
def tiny_bundle(tmp_path, backbones):
    bb, _ = backbones["tiny_convnet"]
    deltas, models = _deltas(bb, "taps", TapsConfig(lam=0.0))
    root = tmp_path / "bundle"
    write_bundle(root, bb, backbone_id(bb, "none", 16), deltas, {"name": "taps", "label": "taps"}, {"a": 10, "b": 10})
    return root, bb, deltas, models


def test_round_trip_reproduces_the_adapted_models(tiny_bundle, digits16):
    root, bb, deltas, models = tiny_bundle
    bundle = load_bundle(root, expect_backbone="tiny_convnet")
    assert bundle.tasks == ["a", "b"]
    x = digits16.test.inputs()
    for t, model in models.items():
        check = compare(model, bundle.merged(t), x)
        assert check["max_abs_diff"] < 1e-5 and check["argmax_agree"] == 1.0
        loaded = bundle.delta(t)
        original = next(d for d in deltas if d.task == t)
        assert list(loaded.entries) == list(original.entries)
        assert loaded.gate_bits == original.gate_bits
        for path, d in original.entries.items():
            for name, tensor in d.tensors().items():
                assert torch.equal(loaded.entries[path].tensors()[name], tensor), (path, name)


@pytest.mark.parametrize("method_name", ["finetune", "linear_probe", "norm_head", "taps", "ftn"])
def test_ledger_equals_bytes_on_disk(tmp_path, backbones, method_name):
    bb, _ = backbones["tiny_convnet"]
    deltas, _ = _deltas(bb, method_name, TapsConfig(lam=0.0) if method_name == "taps" else None)
    root = tmp_path / method_name
    manifest = write_bundle(root, bb, backbone_id(bb, "none", 16), deltas, {"name": method_name}, {"a": 10, "b": 10})
    ledger = manifest["ledger"]
    for d in deltas:
        size, payload = safetensors_payload(root / "tasks" / f"{d.task}.safetensors")
        row = ledger["tasks"][d.task]
        assert row["bytes_on_disk"] == size
        assert payload * 8 == row["bits"] - d.gate_bits  # tensors exactly; gates are entry presence
        assert row["params"] == sum(t.numel() for t in d.flat_tensors().values())
    _, base_payload = safetensors_payload(root / "base.safetensors")
    base_state = bb.features.state_dict()
    assert base_payload * 8 == sum(tensor_bits(t) for t in base_state.values())
    assert ledger["base"]["params"] == sum(t.numel() for t in base_state.values() if t.is_floating_point())


def test_n_x_base_follows_the_papers(tmp_path, backbones):
    bb, _ = backbones["tiny_convnet"]
    results = {}
    for name in ("finetune", "linear_probe"):
        deltas, _ = _deltas(bb, name, tasks=("a", "b", "c"))
        m = write_bundle(tmp_path / name, bb, backbone_id(bb, "none", 16), deltas, {"name": name},
                         {"a": 10, "b": 10, "c": 10})
        results[name] = m["ledger"]
    base = results["finetune"]["base"]["params"]
    head = 10 * 16 + 10
    # fine-tune replaces every base tensor in every task: K copies, the base itself unused
    assert results["finetune"]["base"]["params_in_use"] == 0
    assert results["finetune"]["total"]["n_x_base"] == pytest.approx(3 * (base + head) / base)
    # linear probe: the base once, plus three heads
    assert results["linear_probe"]["total"]["n_x_base"] == pytest.approx((base + 3 * head) / base)


def test_tampered_file_is_named(tiny_bundle):
    root = tiny_bundle[0]
    f = root / "tasks" / "a.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"a\.safetensors: sha256 does not match"):
        load_bundle(root)


def test_truncated_file_is_named(tiny_bundle):
    root = tiny_bundle[0]
    f = root / "base.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(BundleError, match=r"base\.safetensors: 100 bytes, manifest says"):
        load_bundle(root)


def test_bundle_for_another_backbone(tiny_bundle, tmp_path):
    root = tiny_bundle[0]
    with pytest.raises(BundleError, match="is for backbone 'tiny_convnet', not 'efficientnet_lite0'"):
        load_bundle(root, expect_backbone="efficientnet_lite0")
    # a manifest that claims another architecture for these weights
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["backbone"]["kwargs"] = {"width": 12}
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="does not fit backbone"):
        load_bundle(root)


def test_write_failure_leaves_no_bundle(tmp_path, backbones):
    bb, _ = backbones["tiny_convnet"]
    deltas, _ = _deltas(bb, "norm_head")
    with pytest.raises(KeyError):
        write_bundle(tmp_path / "b", bb, backbone_id(bb, "none", 16), deltas, {"name": "x"}, {"a": 10})  # no 'b'
    assert not (tmp_path / "b").exists()
    assert list(tmp_path.iterdir()) == []


def test_merge_names_a_delta_that_does_not_fit(backbones):
    bb, _ = backbones["tiny_convnet"]
    other = build_backbone("tiny_convnet", "none", {"width": 12})
    deltas, _ = _deltas(other, "finetune", tasks=("a",))
    with pytest.raises(ValueError, match=r"task tensor shape .* != base shape"):
        merge(bb.base_net(), deltas[0])
