"""Joint multi-task training, AdaShare and the Skip kind: skippable blocks, policies, losses,
the joint loop, fold exactness, resume, and the runner end to end."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from exporters.compute import count_flops
from pipeline.core.backbones import build_backbone
from pipeline.core.blocks import skippable_blocks
from pipeline.core.bundle import load_bundle
from pipeline.core.delta import read_delta, write_delta
from pipeline.config import ConfigError, parse_config
from pipeline.data import TaskData
from pipeline.core.delta import Skip, TaskDelta
from pipeline.core.fold import compare, merge
from pipeline.core.io import read_json
from pipeline.methods import REGISTRY, build_method
from pipeline.methods.adashare import (AdaShare, AdaShareConfig, PolicyBlock, free_blocks, policy_blocks,
                                       sharing_loss, sparsity_loss, temperature)
from pipeline.stages.rundir import JOINT_UNIT
from pipeline.stages.runner import Runner
from pipeline.methods.context import Schedule
from pipeline.training.joint import build_model, joint_context, train_joint
from tests.conftest import tiny_config

JOINT_METHODS = [name for name, m in REGISTRY.items() if m.trainer == "joint"]
FAST_ADASHARE = {"warmup_epochs": 1, "search_epochs": 1, "samples": 2, "policy_lr": 0.5}


def two_tasks(data: TaskData) -> dict[str, TaskData]:
    """The task and its negative: two tasks with the same labels, different domains."""
    return {"a": data, "b": data.shifted("b", "negative")}


# ---------------------------------------------------------------- skippable blocks


class Residual(nn.Module):
    def __init__(self, c: int, inner: nn.Module | None = None):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.inner = inner

    def forward(self, x):
        y = x + self.conv(x)
        return self.inner(y) if self.inner is not None else y


def test_skippable_blocks_are_the_residual_blocks(backbones):
    assert skippable_blocks(backbones["tiny_convnet"][0].features, 16) == ["blocks.0", "blocks.1"]
    assert skippable_blocks(backbones["tiny_vit"][0].features, 16) == ["blocks.0", "blocks.1"]
    lite0 = skippable_blocks(backbones["efficientnet_lite0"][0].features, 32)
    # inverted residuals with a skip: every block of a stage but the first (which changes shape)
    assert lite0 == ["blocks.1.1", "blocks.2.1", "blocks.3.1", "blocks.3.2", "blocks.4.1", "blocks.4.2",
                     "blocks.5.1", "blocks.5.2", "blocks.5.3"]
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),  # shape changes
                          nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),  # same shape, no residual
                          Residual(4), Residual(4, inner=nn.Sequential(Residual(4))))  # nested: outermost only
    assert skippable_blocks(plain, 8) == ["2", "3"]


# ---------------------------------------------------------------- policy losses and schedules


def test_gumbel_temperature_and_curriculum_follow_the_schedule():
    cfg = AdaShareConfig(warmup_epochs=2, search_epochs=3, blocks_per_epoch=2)
    assert [temperature(cfg, e) for e in range(5)] == pytest.approx([5, 5, 5, 5 * 0.965, 5 * 0.965**2])
    assert [free_blocks(cfg, e, 5) for e in range(5)] == [0, 0, 2, 4, 5]
    # default: every block free by the last search epoch
    assert free_blocks(AdaShareConfig(warmup_epochs=0, search_epochs=3), 2, 9) == 9


def test_sharing_loss_is_zero_when_policies_agree_and_weighs_early_blocks_most():
    agree = torch.tensor([[0.9, 0.2, 0.5], [0.9, 0.2, 0.5]])
    assert float(sharing_loss(agree)) == 0.0
    first = torch.tensor([[1.0, 0.5, 0.5], [0.0, 0.5, 0.5]])
    second = torch.tensor([[0.5, 1.0, 0.5], [0.5, 0.0, 0.5]])
    last = torch.tensor([[0.5, 0.5, 1.0], [0.5, 0.5, 0.0]])
    assert float(sharing_loss(first)) == pytest.approx(2 / 3)  # (L - l) / L with l = 1
    assert float(sharing_loss(second)) == pytest.approx(1 / 3)
    assert float(sharing_loss(last)) == 0.0
    three = torch.tensor([[1.0], [0.0], [0.0]])  # pairs (0,1), (0,2), (1,2) of one block, L = 1: weight 0
    assert float(sharing_loss(three)) == 0.0
    # sparsity: lower when a block is more likely skipped
    assert float(sparsity_loss(torch.tensor([[0.3]]))) < float(sparsity_loss(torch.tensor([[0.7]])))


def test_soft_policy_mixes_and_a_forced_skip_is_the_identity(backbones):
    bb, _ = backbones["tiny_convnet"]
    block = PolicyBlock(copy.deepcopy(bb.features.blocks[0]), num_tasks=2)
    x = torch.randn(2, 8, 8, 8)
    block.mode, block.tau = "soft", 5.0
    with torch.no_grad():
        block.logits[1] = torch.tensor([-30.0, 30.0])  # task 1: skip, for certain
    block.active = 1
    block.train()
    assert torch.allclose(block(x), x, atol=1e-4)
    block.eval()
    assert torch.equal(block(x), x)
    block.active = 0  # equal logits: a real mixture in training, "execute" (p >= 0.5) in eval
    block.train()
    torch.manual_seed(0)
    mixed = block(x)
    assert not torch.allclose(mixed, x) and not torch.allclose(mixed, block.block(x))
    block.eval()
    assert torch.equal(block(x), block.block(x))


# ---------------------------------------------------------------- the joint loop


def test_joint_loop_runs_every_task_every_step_with_its_weight(backbones, digits16):
    bb, _ = backbones["tiny_convnet"]
    tasks = two_tasks(digits16)
    method = build_method("joint_finetune", build_method("joint_finetune").Config(task_weights={"b": 0.0}))
    seen = []
    heads_before = {}

    def watch(model):
        for i, head in enumerate(model.heads):
            heads_before[i] = head.weight.detach().clone()
            head.register_forward_hook(lambda m, a, o, i=i: seen.append(model.tasks[i]) if m.training else None)

    prepare = method.prepare
    method.prepare = lambda model, variant=0: (prepare(model, variant), watch(model))[0]
    sched = Schedule(epochs=2, batch_size=32, lr=0.05, recalibrate_norms=False)
    out = train_joint(bb, tasks, method, sched, seed=0, progress=False)
    assert out.steps == 2 * 3  # 96 images per task, batch 32
    assert seen == ["a", "b"] * 6  # one batch of every task per step, in task order
    # task "b" has loss weight 0: its head never moves; task "a"'s does
    assert torch.equal(out.model.heads[1].weight, heads_before[1])
    assert not torch.equal(out.model.heads[0].weight, heads_before[0])
    # per-task norms: the two tasks' BatchNorm statistics differ (negative images)
    first = out.model.features.bn
    assert not torch.equal(first.per_task[0].running_mean, first.per_task[1].running_mean)


@pytest.mark.parametrize("bb_name", ["tiny_convnet", "tiny_vit", "efficientnet_lite0"])
@pytest.mark.parametrize("method_name", JOINT_METHODS)
def test_joint_train_then_fold_is_exact(backbones, digits16, digits32, bb_name, method_name):
    bb, size = backbones[bb_name]
    data = digits16 if size == 16 else digits32
    tasks = two_tasks(data)
    params = FAST_ADASHARE | {"lam_sparsity": 2.0} if method_name == "adashare" else {}
    method = build_method(method_name, build_method(method_name).Config(**params))
    before = {k: v.clone() for k, v in bb.features.state_dict().items()}
    out = train_joint(bb, tasks, method, Schedule(epochs=1, batch_size=32, lr=0.05), seed=0, progress=False)
    base = out.model.shared_base()
    assert not any(hasattr(m, "parametrizations") for m in base.modules())
    for task in tasks:
        delta = method.task_delta(out.model, task)
        merged = merge(base, delta)
        x = tasks[task].test.inputs()
        check = compare(out.model.use(task), merged, x)
        assert check["max_abs_diff"] < 1e-5 and check["argmax_agree"] == 1.0, (task, check)
        assert type(merged.features) is type(bb.features)
        if method_name == "adashare":
            skipped = [p for p, e in delta.entries.items() if isinstance(e, Skip)]
            executed = method.describe(out.model, task).executed
            assert len(skipped) == executed.count(False)
            for path in skipped:
                assert isinstance(merged.get_submodule(path), nn.Identity)
            full = count_flops(merge(base, TaskDelta(task, "x", {"head": delta.entries["head"]})), size)
            assert (count_flops(merged, size) < full) == bool(skipped)
    # the jointly trained weights moved; the backbone object did not
    assert any(not torch.equal(v, base.features.state_dict()[k]) for k, v in before.items() if v.is_floating_point())
    for k, v in bb.features.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_adashare_forced_skip_folds_to_a_smaller_graph_that_equals_the_policy_model(backbones, digits16):
    bb, size = backbones["tiny_convnet"]
    tasks = two_tasks(digits16)
    method = AdaShare(AdaShareConfig(**FAST_ADASHARE))
    method.setup(joint_context(bb, tasks, Schedule(epochs=1, batch_size=32, lr=0.05), seed=0))
    # alpha forced: task "a" skips block 1, task "b" runs everything
    logits = torch.zeros(2, 2, 2)
    logits[0, 1] = torch.tensor([-30.0, 30.0])  # zeros elsewhere: p(execute) 0.5, which executes
    method.policies = method.sample(logits, 1, seed=0)
    model = build_model(bb, tasks, method, seed=0).eval()
    base = model.shared_base()
    x = tasks["a"].test.inputs()
    da, db = method.task_delta(model, "a"), method.task_delta(model, "b")
    assert [p for p, e in da.entries.items() if isinstance(e, Skip)] == ["features.blocks.1"]
    assert not any(isinstance(e, Skip) for e in db.entries.values())
    assert not any(p.startswith("features.blocks.1.") for p in da.entries)  # a skipped block's norms are not stored
    assert da.gate_bits == db.gate_bits == 2
    merged = merge(base, da)
    assert compare(model.use("a"), merged, x)["max_abs_diff"] == 0.0
    assert count_flops(merged, size) < count_flops(merge(base, db), size)
    # the same decision through the soft policy in eval mode
    soft = AdaShare(AdaShareConfig(**FAST_ADASHARE))
    soft.blocks, soft.stage = method.blocks, "search"  # the search's model, without running a search
    policy_model = build_model(bb, tasks, soft, seed=0)
    policy_model.load_state_dict(model.state_dict())
    for (_, block), lg in zip(policy_blocks(policy_model), logits.unbind(1)):
        block.mode = "soft"
        with torch.no_grad():
            block.logits.copy_(lg)
    assert compare(policy_model.use("a"), merged, x)["max_abs_diff"] == 0.0


def test_skip_entries_survive_the_bundle_and_the_ledger_drops_blocks_no_task_runs(tmp_path, backbones):
    bb, _ = backbones["tiny_convnet"]
    block = bb.features.blocks[1]
    d = TaskDelta("a", "adashare", {"features.blocks.1": Skip.of(block)}, gate_bits=2)
    write_delta(tmp_path / "a.safetensors", d)
    back = read_delta(tmp_path / "a.safetensors")
    assert isinstance(back.entries["features.blocks.1"], Skip) and back.gate_bits == 2
    assert back.params() == 0 and back.bits() == 2
    from pipeline.core.ledger import build_ledger
    from pipeline.core.bundle import base_state

    state = base_state(bb)
    files = {"base": tmp_path / "a.safetensors", "a": tmp_path / "a.safetensors"}
    ledger = build_ledger(state, [back], files)
    block_params = sum(v.numel() for v in block.state_dict().values() if v.is_floating_point())
    assert ledger["base"]["params"] - ledger["base"]["params_in_use"] == block_params


def test_resumed_joint_training_equals_uninterrupted(tmp_path, backbones, digits16):
    bb, _ = backbones["tiny_convnet"]
    tasks = two_tasks(digits16)
    sched = Schedule(epochs=3, batch_size=32, lr=0.05)
    method = lambda: build_method("joint_taps")  # noqa: E731
    whole = train_joint(bb, tasks, method(), sched, seed=1, progress=False)
    first = train_joint(bb, tasks, method(), sched, seed=1, workdir=tmp_path, signature="s", progress=False,
                        stop_after_epoch=1)
    assert len(first.history) == 1
    resumed = train_joint(bb, tasks, method(), sched, seed=1, workdir=tmp_path, signature="s", progress=False)
    assert resumed.resumed_from_epoch == 1 and resumed.history == whole.history
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- the runner


def joint_config(tmp_path, **over) -> dict:
    return tiny_config(tmp_path, methods=[
        "joint_finetune", {"name": "joint_taps", "lam": 1.0},
        {"name": "adashare", **FAST_ADASHARE, "lam_sparsity": 2.0},
        {"name": "taps", "label": "taps_from_joint", "base": "joint_finetune"}, "norm_head"], **over)


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("joint")
    cfg = parse_config(joint_config(tmp))
    out = tmp / "out"
    Runner(cfg, out, progress=False, log=lambda s: None).run()
    return cfg, out


def test_joint_run_bundles_the_shared_weights_as_base(joint_run):
    cfg, out = joint_run
    pretrained = build_backbone("tiny_convnet", "none").features.state_dict()
    for label in ("joint_finetune", "joint_taps", "adashare"):
        shared = load_file(str(out / "train" / label / JOINT_UNIT / "shared.safetensors"))
        bundle = load_file(str(out / "bundles" / label / "base.safetensors"))
        assert shared.keys() == bundle.keys() and all(torch.equal(shared[k], bundle[k]) for k in shared)
        assert not torch.equal(shared["features.stem.weight"], pretrained["stem.weight"])
        assert not (out / "train" / label / JOINT_UNIT / "scratch").exists()
    # the memory-efficient variant's bundle starts from joint_finetune's shared weights
    a = load_file(str(out / "bundles" / "taps_from_joint" / "base.safetensors"))
    b = load_file(str(out / "bundles" / "joint_finetune" / "base.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    export = read_json(out / "stages" / "export.json")
    skips = []
    for label in ("joint_finetune", "joint_taps", "adashare", "taps_from_joint"):
        bundle = load_bundle(out / "bundles" / label)
        for task in bundle.tasks:
            assert export["parity"][f"{label}/{task}"]["argmax_agree"] == 1.0
            skipped = any(isinstance(e, Skip) for e in bundle.delta(task).entries.values())
            assert (export["flops"][f"{label}/{task}"] < export["flops"]["base"]) == skipped
            skips.append(skipped)
    # one architecture: AdaShare's tasks that skip blocks reuse its trace with those blocks cut out
    assert any(skips) and export["traces"] == 1
    res = read_json(out / "results.json")
    assert res["methods"]["adashare"]["setting"] == "joint"
    assert res["methods"]["taps_from_joint"]["setting"] == "incremental from joint_finetune"
    assert len(res["methods"]["adashare"]["joint"]["candidates"]) == 2
    report = (out / "report.md").read_text()
    assert "## Joint and incremental" in report and "Blocks each task skips" in report
    assert (out / "plots" / "policy_adashare.png").stat().st_size > 0


def test_retraining_a_joint_base_retrains_what_starts_from_it(joint_run, tmp_path):
    cfg, out = joint_run
    logs = []
    Runner(cfg, out, progress=False, log=logs.append).run(until="train")
    assert not [s for s in logs if s.startswith("train ") and "skipped" not in s]
    raw = joint_config(tmp_path)
    raw["methods"][0] = {"name": "joint_finetune", "lr": 0.02}
    logs = []
    Runner(parse_config(raw), out, progress=False, log=logs.append).run(until="train")
    trained = {s.split(":")[0].split()[1] for s in logs if s.startswith("train ") and "skipped" not in s}
    assert trained == {"joint_finetune", "taps_from_joint/digits", "taps_from_joint/digits_neg"}


@pytest.mark.parametrize("methods, message", [
    (["finetune", {"name": "taps", "base": "finetune"}], r"methods\[1\]\.base: 'finetune' is a 'finetune' entry"),
    ([{"name": "taps", "base": "later"}, {"name": "joint_finetune", "label": "later"}],
     r"methods\[0\]\.base: 'later' is not the label of an earlier method entry"),
    ([{"name": "adashare", "task_weights": {"nope": 1.0}}], r"methods\[0\]\.task_weights: unknown tasks \['nope'\]"),
    ([{"name": "joint_taps", "task_weights": {"digits": -1}}], r"methods\[0\]\.task_weights: .*>= 0"),
])
def test_joint_config_errors_name_the_field(tmp_path, methods, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(tiny_config(tmp_path, methods=methods), "cfg.yaml")


def test_adashare_refuses_a_backbone_without_skippable_blocks(digits16):
    bb = build_backbone("tiny_convnet", "none")
    bb = dataclasses.replace(bb, features=nn.Sequential(nn.Conv2d(3, 16, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    with pytest.raises(ValueError, match="no skippable block"):
        train_joint(bb, two_tasks(digits16), AdaShare(AdaShareConfig(**FAST_ADASHARE)),
                    Schedule(epochs=1, batch_size=32, lr=0.05), seed=0, progress=False)


def test_a_joint_bundle_shares_its_own_base_in_the_deployment_forms(tmp_path):
    raw = tiny_config(tmp_path, methods=["joint_finetune", "norm_head"], export={"forms": ["shared", "switch"]})
    raw["backbone"]["kwargs"] = {"width": 32}  # tensors big enough to go to data files (>= 1 KiB)
    out = tmp_path / "out"
    Runner(parse_config(raw), out, progress=False, log=lambda s: None).run(until="export")
    forms = read_json(out / "exports" / "forms.json")
    (extra, size), = forms["extra_bases"].items()
    assert extra.startswith("shared/bases/") and size > 0
    joint, plain = forms["methods"]["joint_finetune"], forms["methods"]["norm_head"]
    assert extra in joint["shared"]["files"] and extra in joint["switch"]["files"]
    assert "shared/base.data" not in joint["shared"]["files"] and "shared/base.data" in plain["shared"]["files"]
    assert extra not in plain["shared"]["files"]
    # per task only norms and head are the task's own, as for norm_head on the pretrained base
    own = lambda form: sum(d["data_bytes"] for d in form["detail"].values())  # noqa: E731
    assert own(joint["shared"]) == own(plain["shared"])
    checks = read_json(out / "stages" / "export.json")["form_checks"]
    for task in ("digits", "digits_neg"):
        for form in ("shared", "switch"):
            assert checks[f"joint_finetune/{task}/{form}"]["max_abs_diff"] < 1e-4
            assert checks[f"joint_finetune/{task}/{form}"]["argmax_agree"] == 1.0
