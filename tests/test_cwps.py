"""CWPS: the parent search, the mask stages, channel-select storage, pointers through a bundle,
and the multi-task passes through the runner."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pipeline.core.bundle import BundleError, backbone_id, load_bundle, write_bundle
from pipeline.config import parse_config
from pipeline.core.delta import ChannelSelect, TaskDelta
from pipeline.core.fold import compare, merge
from pipeline.core.io import read_json
from pipeline.methods import build_method
from pipeline.methods.context import TaskContext
from pipeline.methods.layers import adaptable_layers
from pipeline.methods.cwps import CwpsConfig, mixed_layers
from pipeline.stages.fold import entry_versions
from pipeline.stages.runner import Runner
from pipeline.core.ledger import safetensors_payload
from pipeline.methods.context import Schedule
from tests.conftest import tiny_config

LAYER = "features.blocks.0.conv_pw"  # a 1x1 conv of the tiny convnet (16 channels)


def _own_all(bb, task: str, offset: float) -> TaskDelta:
    """A pool version that owns every row of every layer: base + ``offset``."""
    entries = {}
    for path, layer in adaptable_layers(bb.base_net()):
        w = layer.weight.detach()
        c = w.shape[0]
        bias = layer.bias.detach() + offset if layer.bias is not None else None
        entries[path] = ChannelSelect(torch.ones(c, dtype=torch.bool), w + offset, torch.zeros(0, dtype=torch.uint8),
                                      ["base"], bias)
    return TaskDelta(task, "cwps", entries)


def _prepared(bb, data, tmp_path, reference: dict, versions: dict, cfg: CwpsConfig):
    """A CWPS model prepared against a given reference (placed in the search cache) and pool."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in reference.items()}, str(scratch / "reference.safetensors"))
    (scratch / "search.json").write_text('{"search_epochs": 1, "reference_seconds": 0}')
    method = build_method("cwps", cfg)
    method.setup(TaskContext(bb, data, Schedule(2, 32, 0.05), 0, tmp_path, versions=versions, pool=list(versions)))
    model = bb.task_net(data.num_classes, seed=0)
    method.prepare(model)
    return method, model


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_parent_search_picks_the_nearest_kernel(backbones, digits16, tmp_path, distance):
    bb, _ = backbones["tiny_convnet"]
    far = _own_all(bb, "far", 5.0)  # every row far from the reference (in l2 and, being shifted, in angle)
    near = _own_all(bb, "near", 5.0)
    reference = {k: v.clone() for k, v in bb.task_net(10, seed=0).state_dict().items()}
    w = reference[f"{LAYER}.weight"]
    # channel 0: the reference is "near"'s row exactly; channel 1: 3x base (cosine says base, l2 does not)
    near.entries[LAYER].rows[0] = w[0] + 0.01
    w[0] = w[0] + 0.01
    w[1] = 3 * w[1]
    versions = {"far@1": far, "near@1": near}
    _, model = _prepared(bb, digits16, tmp_path / distance, reference, versions, CwpsConfig(distance=distance))
    mix = dict((p, m) for p, _, m in mixed_layers(model))[LAYER]
    assert mix.owners[0] == "near@1"
    assert torch.equal(mix.parent[0], near.entries[LAYER].rows[0])
    if distance == "cosine":
        assert mix.owners[1] == "base"
    # every other channel of this layer is nearest to the base (the pool rows are shifted by 5)
    assert all(o == "base" for o in mix.owners[2:])
    # scores start at the standardised distance: the far-from-parent channel 1 (l2) leans own
    if distance == "l2":
        assert mix.gate.score[1] == mix.gate.score.max()


def test_hard_mask_at_lambda_0_and_1_is_fine_tune_and_parent(backbones, digits16, tmp_path):
    bb, _ = backbones["tiny_convnet"]
    reference = {k: v + 0.1 if k.endswith("weight") else v for k, v in bb.task_net(10, seed=0).state_dict().items()}
    base = bb.base_net()
    for lam in (0.0, 1.0):
        _, model = _prepared(bb, digits16, tmp_path / str(lam), reference, {}, CwpsConfig(lam=lam))
        layers = mixed_layers(model)
        assert len(layers) == len(adaptable_layers(base))
        for path, layer, mix in layers:
            mix.gate.hard.fill_(True)
            with torch.no_grad():
                mix.gate.score.uniform_(-30, 30)  # far beyond any sigmoid rounding
            # lam 0: the child (the reference fine-tune's weights); lam 1: the parent (here the base)
            target = reference[f"{path}.weight"] if lam == 0 else base.get_submodule(path).weight
            assert torch.equal(layer.weight, target), (lam, path)


def _select(mask: list[bool], rows, sources, pointers, bias=None) -> ChannelSelect:
    m = torch.tensor(mask)
    return ChannelSelect(m, rows, torch.tensor([sources.index(p) for p in pointers], dtype=torch.uint8), sources, bias)


def test_pointers_resolve_to_the_right_rows_after_a_bundle_round_trip(backbones, tmp_path):
    bb, _ = backbones["tiny_convnet"]
    w = bb.base_net().get_submodule(LAYER).weight.detach()
    c = w.shape[0]
    a_rows = torch.randn(c, *w.shape[1:])
    a = TaskDelta("a", "cwps", {LAYER: _select([True] * c, a_rows, ["base"], [])})
    # b: own row for channel 0, channel 1 from a, the rest from the base
    b_row = torch.randn(1, *w.shape[1:])
    pointers = ["a"] + ["base"] * (c - 2)
    b = TaskDelta("b", "cwps", {LAYER: _select([True] + [False] * (c - 1), b_row, ["base", "a"], pointers)})
    head = {"head": build_method("linear_probe").task_delta(bb.task_net(3), "x").entries["head"]}
    for d in (a, b):
        d.entries.update(head)
    files = write_bundle(tmp_path / "bundle", bb, backbone_id(bb, "none", 16), [a, b],
                         {"name": "cwps"}, {"a": 3, "b": 3})
    bundle = load_bundle(tmp_path / "bundle")
    merged = bundle.merged("b").get_submodule(LAYER).weight
    assert torch.equal(merged[0], b_row[0])
    assert torch.equal(merged[1], a_rows[1])
    assert torch.equal(merged[2:], w[2:])
    # the ledger: 1 bit per mask entry, own rows at 32 bits, 1 bit per pointer (2 sources)
    entry = bundle.delta("b").entries[LAYER]
    assert entry.bits() == c + 32 * b_row.numel() + (c - 1) * 1
    assert entry.params() == b_row.numel()
    size, payload = safetensors_payload(tmp_path / "bundle/tasks/b.safetensors")
    assert files["ledger"]["tasks"]["b"]["bytes_on_disk"] == size
    # on disk, mask entries and pointers take a byte each (bool, uint8): 7 bits more than counted
    assert payload * 8 == files["ledger"]["tasks"]["b"]["bits"] + 7 * c + 7 * (c - 1)
    assert "weight" in a.entries[LAYER].covers() and b.entries[LAYER].covers() == []
    # a bundle that would lose a pointed-to task is refused before anything is written
    with pytest.raises(BundleError, match="points to"):
        write_bundle(tmp_path / "lone", bb, backbone_id(bb, "none", 16), [b], {"name": "cwps"}, {"b": 3})
    assert not (tmp_path / "lone").exists()


def test_a_pointer_to_a_missing_or_borrowed_row_is_refused(backbones, tmp_path):
    bb, _ = backbones["tiny_convnet"]
    w = bb.base_net().get_submodule(LAYER).weight.detach()
    c = w.shape[0]
    b = _select([False] * c, w[:0], ["base", "a"], ["a"] * c)
    with pytest.raises(ValueError, match="not linked"):
        b.resolve(w, None)
    # a does not own channel 0: b may not point there
    a = _select([False] + [True] * (c - 1), w[1:] + 1, ["base"], ["base"])
    b.link({"a": a})
    with pytest.raises(ValueError, match="does not own"):
        b.resolve(w, None)
    with pytest.raises(ValueError, match="pointers"):
        ChannelSelect(torch.ones(c, dtype=torch.bool), w[:1], torch.zeros(0, dtype=torch.uint8), ["base"])


def test_bundle_rebases_pointers_of_replaced_versions(backbones):
    """Multi-task passes: b borrowed from a@1, then a@2 replaced a@1 in the pool. The bundle keeps
    a@2 for a, so b's rows from a@1 become b's own rows, and b's merged weights do not change."""
    bb, _ = backbones["tiny_convnet"]
    w = bb.base_net().get_submodule(LAYER).weight.detach()
    c = w.shape[0]
    a1 = TaskDelta("a", "cwps", {LAYER: _select([True] * c, w + 1, ["base"], [])})
    a2 = TaskDelta("a", "cwps", {LAYER: _select([True] * c, w + 2, ["base"], [])})
    b1 = TaskDelta("b", "cwps", {LAYER: _select([False] * c, w[:0], ["base", "a@1", "a@2"], ["a@1", "a@2"] + ["base"] * (c - 2))})
    versions = {"a@1": a1, "a@2": a2, "b@1": b1}
    for d in versions.values():
        d.link(versions)
    before = b1.entries[LAYER].resolve(w, None)[0]
    stored = build_method("cwps").bundle_deltas({"a": "a@2", "b": "b@1"}, versions)
    b = stored[1].entries[LAYER]
    assert b.mask.tolist() == [True] + [False] * (c - 1)  # the a@1 row is b's own now
    assert b.pointers() == ["a"] + ["base"] * (c - 2) and b.sources == ["base", "a"]
    assert torch.equal(b.resolve(w, None)[0], before)


def test_cwps_runs_incremental_and_multitask_through_the_runner(tmp_path):
    """Two passes over two tasks: every unit trains, each task keeps its best-validation pass, the
    bundle folds exactly, ONNX equals torch, and the bundle's bytes equal its ledger."""
    cfg = tiny_config(tmp_path, methods=[{"name": "cwps", "lam": 0.5, "passes": 2}],
                      export={"forms": ["shared"]}, bench={"warmup": 1, "runs": 2, "batch_sizes": [1], "forms": False})
    runner = Runner(parse_config(cfg), tmp_path / "run", progress=False, log=lambda s: None)
    runner.run(until="export")
    out = tmp_path / "run"
    for task in ("digits", "digits_neg"):
        result = read_json(out / "train/cwps" / task / "result.json")
        assert [p["pass"] for p in result["passes"]] == [1, 2]
        assert result["kept"] == max(result["passes"], key=lambda p: p["val_acc"])["version"]
    # pass 2 of the first task saw both tasks' pass-1 versions in its pool
    desc = read_json(out / "train/cwps/digits/pass2/result.json")["describe"]
    assert desc["pool"] == ["digits@1", "digits_neg@1"]
    assert desc["search_epochs"] == 1 and desc["reference_seconds"] > 0
    # the bundle (pointers renamed to tasks, replaced versions' rows copied in) gives the very
    # models that training folded from the versions it kept
    bundle = load_bundle(out / "bundles/cwps")
    ctx = runner.ctx
    final, versions = entry_versions(ctx, runner.cfg.methods[0])
    for task in bundle.tasks:
        x = ctx.data(task).test.inputs()
        trained = merge(ctx.backbone.base_net(), versions[final[task]])
        assert compare(trained, bundle.merged(task), x)["max_abs_diff"] == 0
    parity = runner.run_dir.record("export")["parity"]
    assert all(v["max_abs_diff"] < 1e-4 and v["argmax_agree"] == 1.0 for v in parity.values())
    ledger = read_json(out / "bundles/cwps/manifest.json")["ledger"]
    for task, t in ledger["tasks"].items():
        size, _ = safetensors_payload(out / "bundles/cwps/tasks" / f"{task}.safetensors")
        assert t["bytes_on_disk"] == size
    assert not any((out / "train/cwps" / t / f"pass{p}" / "scratch").exists() for t in bundle.tasks for p in (1, 2))


def test_resumed_cwps_unit_equals_uninterrupted(tmp_path, backbones, digits16):
    """The search is cached and the mask stage is checkpointed, so a killed unit resumes exactly."""
    from pipeline.core.delta import write_delta
    from pipeline.training.incremental import train_task

    bb, _ = backbones["tiny_convnet"]
    schedule = Schedule(3, 32, 0.05)
    cfg = CwpsConfig(lam=0.5, soft_fraction=0.34)  # 1 soft epoch, then 2 hard: the cut falls in the hard stage
    method = build_method("cwps", cfg)
    whole = train_task(bb, digits16, method, schedule, 0, tmp_path / "whole", "s", False)
    expected = method.task_delta(whole.model, "digits").flat_tensors()
    train_task(bb, digits16, build_method("cwps", cfg), schedule, 0, tmp_path / "cut", "s", False, stop_after_epoch=2)
    assert (tmp_path / "cut/scratch/reference.safetensors").is_file()
    method = build_method("cwps", cfg)
    resumed = train_task(bb, digits16, method, schedule, 0, tmp_path / "cut", "s", False)
    assert resumed.resumed_from_epoch == 2
    got = method.task_delta(resumed.model, "digits").flat_tensors()
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
