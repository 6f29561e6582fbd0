"""Every registered method and every registered delta kind, through one generic table: what each
method emits round-trips through the file codec and a bundle to the same model, its ledger
equals the bytes on disk, and every kind is emitted by some method (a kind nobody emits is a
kind nobody tests)."""
from __future__ import annotations

import pytest
import torch

from pipeline.core.bundle import backbone_id, load_bundle, write_bundle
from pipeline.core.delta import KINDS, TaskDelta
from pipeline.core.delta.codec import decode, metadata
from pipeline.core.fold import compare, merge
from pipeline.core.ledger import safetensors_payload
from pipeline.methods import REGISTRY, build_method
from pipeline.methods.context import Schedule
from pipeline.training.incremental import train_task
from pipeline.training.joint import train_joint
from tests.test_joint import FAST_ADASHARE, two_tasks

# settings that make a short run exercise the method's sparse decisions (some layers or blocks off)
SETTINGS = {"taps": {"lam": 5.0, "l1_warmup_epochs": 0}, "joint_taps": {"lam": 5.0, "l1_warmup_epochs": 0},
            "adashare": FAST_ADASHARE | {"lam_sparsity": 2.0}, "cwps": {"lam": 0.5}}


@pytest.fixture(scope="module")
def emitted(backbones, digits16):
    """method -> (base model the deltas merge onto, {task: (trained model, delta)})."""
    bb, _ = backbones["tiny_convnet"]
    tasks = two_tasks(digits16)
    out = {}
    for name, cls in REGISTRY.items():
        params = cls.Config(**SETTINGS.get(name, {}))
        sched = Schedule(epochs=2, batch_size=32, lr=0.05)
        if cls.trainer == "joint":
            method = build_method(name, params)
            res = train_joint(bb, tasks, method, sched, seed=0, progress=False)
            out[name] = (res.model.shared_base(), {t: (res.model.use(t), method.task_delta(res.model, t)) for t in tasks})
        else:
            trained = {}
            for t, data in tasks.items():
                method = build_method(name, params)
                res = train_task(bb, data, method, sched, seed=0, progress=False)
                trained[t] = (res.model, method.task_delta(res.model, t))
            out[name] = (bb.base_net(), trained)
    return out


def test_every_registered_kind_is_emitted_by_some_method(emitted):
    kinds = {e.kind for _, tasks in emitted.values() for _, d in tasks.values() for e in d.entries.values()}
    assert kinds == set(KINDS)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_codec_round_trip_is_exact(emitted, name):
    _, tasks = emitted[name]
    for task, (_, delta) in tasks.items():
        back = decode(delta.flat_tensors(), metadata(delta))
        assert (back.task, back.method, back.gate_bits) == (delta.task, delta.method, delta.gate_bits)
        assert list(back.entries) == list(delta.entries)
        for path, entry in delta.entries.items():
            assert back.entries[path].kind == entry.kind and back.entries[path].attrs() == entry.attrs()
            for k, v in entry.tensors().items():
                assert torch.equal(back.entries[path].tensors()[k], v), (path, k)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_bundle_merges_to_the_trained_model_and_its_ledger_is_the_disk(tmp_path, emitted, backbones, digits16, name):
    bb, _ = backbones["tiny_convnet"]
    base, tasks = emitted[name]
    deltas = [d for _, d in tasks.values()]
    names = {d.task: d for d in deltas}
    for d in deltas:
        d.link(names)
    shared_bb = type(bb)(bb.name, base.features, bb.num_features, bb.mean, bb.std, bb.kwargs)
    manifest = write_bundle(tmp_path / name, shared_bb, backbone_id(shared_bb, "none", 16), deltas, {"name": name},
                            {t: 10 for t in tasks})
    bundle = load_bundle(tmp_path / name, expect_backbone="tiny_convnet")
    x = digits16.test.inputs()
    for task, (model, delta) in tasks.items():
        images = x if task == "a" else digits16.shifted("b", "negative").test.inputs()
        if hasattr(model, "use"):  # a joint model: switch it to this task
            model.use(task)
        check = compare(model, bundle.merged(task), images)
        assert check["max_abs_diff"] < 1e-5 and check["argmax_agree"] == 1.0, (task, check)
        size, payload = safetensors_payload(tmp_path / name / "tasks" / f"{task}.safetensors")
        row = manifest["ledger"]["tasks"][task]
        assert row["bytes_on_disk"] == size and row["bits"] == delta.bits() and row["params"] == delta.params()
        # the payload is exactly the entries' tensors
        assert payload == sum(t.numel() * t.element_size() for t in delta.flat_tensors().values())
        assert isinstance(bundle.delta(task), TaskDelta)
