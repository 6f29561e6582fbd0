"""The stage runner end to end on a tiny config: outputs, skipping, resume, clear errors."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from pipeline.core.backbones import build_backbone
from pipeline.cli import main
from pipeline.config import ConfigError, load_config, parse_config
from pipeline.data import DataError
from pipeline.methods import build_method
from pipeline.methods.taps import TapsConfig
from pipeline.stages.runner import Runner
from pipeline.stages.units import unit_hash
from pipeline.methods.context import Schedule
from pipeline.training.engine import TrainingError
from pipeline.training.incremental import train_task
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = parse_config(tiny_config(tmp))
    out = tmp / "out"
    Runner(cfg, out, progress=False, log=lambda s: None).run()
    return cfg, out


def test_run_writes_every_artefact(finished_run):
    cfg, out = finished_run
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "taskfold-results/1"
    assert set(res["methods"]) == {"finetune", "linear_probe", "norm_head", "taps", "ftn"}
    for label, m in res["methods"].items():
        assert (out / "bundles" / label / "manifest.json").is_file()
        for task, t in m["tasks"].items():
            assert (out / "exports" / label / f"{task}.onnx").is_file()
            assert t["onnx"]["max_abs_diff"] < 1e-4 and t["onnx"]["argmax_agree"] == 1.0
            assert t["fold_check"]["max_abs_diff"] < 1e-5
            assert set(t["latency"]) == {"batch1", "batch4"}
            assert 0 <= t["test_acc"] <= 1
    report = (out / "report.md").read_text()
    assert "| taps |" in report and "plots/accuracy_vs_params.png" in report
    assert (out / "plots" / "accuracy_vs_params.png").stat().st_size > 1000
    assert (out / "plots" / "layer_map_taps.png").stat().st_size > 1000
    assert not list(out.rglob("checkpoint.pt"))  # finished units keep no checkpoints
    assert not list(out.rglob("*.tmp"))


def test_sweeps_are_found_and_plotted(tmp_path):
    from pipeline.report import plot_sweep, sweeps

    def method(name, acc, **params):
        return {"method": name, "params": params, "mean_test_acc": acc, "n_x_base": 1 + params.get("rank", 0) / 100,
                "tasks": {"a": {"test_acc": acc, "storage": {"bytes_on_disk": 10}}}}

    res = {"tasks": {"a": {}}, "methods": {
        "r10": method("ftn", 0.7, rank=10, alpha=1.0), "r1": method("ftn", 0.5, rank=1, alpha=1.0),
        "r5": method("ftn", 0.6, rank=5, alpha=1.0), "probe": method("linear_probe", 0.4),
        "t1": method("taps", 0.7, lam=1.0, tau=0.1), "t2": method("taps", 0.6, lam=2.0, tau=0.2),
        "t3": method("taps", 0.5, lam=3.0, tau=0.1)}}
    found = sweeps(res)
    # taps varies two parameters at once: not a sweep
    assert found == [{"method": "ftn", "param": "rank", "values": [1, 5, 10], "labels": ["r1", "r5", "r10"]}]
    plot_sweep(res, found[0], tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_second_run_skips_every_stage(finished_run):
    cfg, out = finished_run
    logs = []
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.onnx")}
    Runner(cfg, out, progress=False, log=logs.append).run()
    assert any("prepare: up to date" in s for s in logs)
    assert sum("up to date, skipped" in s for s in logs) == 1 + 10 + 3  # prepare, 10 units, fold/export/bench
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.onnx")} == before


def test_forcing_a_stage_reruns_it_and_every_stage_after_it(finished_run):
    cfg, out = finished_run
    logs = []
    Runner(cfg, out, progress=False, log=logs.append).run(force=("export",))
    skipped = {s.split(":")[0] for s in logs if "up to date, skipped" in s}
    assert {"prepare", "fold"} <= skipped and not {"export", "bench"} & skipped


def test_changing_one_method_retrains_only_that_method(finished_run, tmp_path):
    cfg, out = finished_run
    raw = tiny_config(tmp_path)
    raw["methods"][3] = {"name": "taps", "lam": 2.0}
    logs = []
    Runner(parse_config(raw), out, progress=False, log=logs.append).run(until="fold")
    trained = [s for s in logs if s.startswith("train ") and "skipped" not in s]
    assert trained and all(s.startswith("train taps/") for s in trained)
    assert any(s.startswith("fold taps") for s in logs)


@pytest.mark.parametrize("method", ["taps", "joint_finetune"])
def test_validating_less_often_trains_the_same_weights(tmp_path, method):
    """``train.validate_every`` skips validations (the last epoch is always validated); the
    trained deltas are bit-identical and the unit's hash does not change."""
    from safetensors.torch import load_file

    runs = {}
    for every in (1, 2):
        raw = tiny_config(tmp_path, methods=[method])
        raw["train"] |= {"epochs": 3, "validate_every": every}
        out = tmp_path / f"every{every}"
        Runner(parse_config(raw), out, progress=False, log=lambda s: None).run(until="train")
        runs[every] = out
    for delta in runs[1].rglob("delta.safetensors"):
        a, b = load_file(str(delta)), load_file(str(runs[2] / delta.relative_to(runs[1])))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    result = json.loads(next(runs[2].rglob("digits/result.json")).read_text())
    assert ["val_acc" in e for e in result["history"]] == [False, True, True]  # epochs 2 and 3 (the last)
    assert result["hash"] == json.loads(next(runs[1].rglob("digits/result.json")).read_text())["hash"]


def test_resumed_training_equals_uninterrupted(tmp_path, digits16):
    bb = build_backbone("tiny_convnet", "none")
    sched = Schedule(epochs=3, batch_size=32, lr=0.05)
    whole = train_task(bb, digits16, build_method("taps", TapsConfig(lam=1.0)), sched, seed=3, progress=False)
    work = tmp_path / "unit"
    first = train_task(bb, digits16, build_method("taps", TapsConfig(lam=1.0)), sched, seed=3, workdir=work,
                       signature="s", progress=False, stop_after_epoch=1)
    assert len(first.history) == 1 and (work / "checkpoint.pt").is_file()
    resumed = train_task(bb, digits16, build_method("taps", TapsConfig(lam=1.0)), sched, seed=3, workdir=work,
                         signature="s", progress=False)
    assert resumed.resumed_from_epoch == 1
    assert (whole.steps, first.steps, resumed.steps) == (9, 3, 6)  # 96 images, batch 32, 3 epochs
    assert resumed.history == whole.history
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a checkpoint of another config (the unit's settings changed) is not mixed in: it is replaced, saying so
    logs = []
    fresh = train_task(bb, digits16, build_method("taps"), sched, seed=3, workdir=work, signature="other",
                       progress=False, stop_after_epoch=1, log=logs.append)
    assert fresh.resumed_from_epoch == 0 and any("checkpoint of another config; removed" in s for s in logs)


def test_nan_loss_is_named_and_writes_no_delta(tmp_path):
    raw = tiny_config(tmp_path, methods=[{"name": "finetune", "lr": 1e12}])
    raw["train"]["epochs"] = 3
    out = tmp_path / "out"
    with pytest.raises(TrainingError, match=r"finetune/digits: loss is (nan|inf) at epoch"):
        Runner(parse_config(raw), out, progress=False, log=lambda s: None).run()
    assert not list(out.rglob("delta.safetensors"))
    assert not (out / "bundles").exists()


@pytest.mark.parametrize("method", ["finetune", "joint_finetune"])
def test_a_fold_that_differs_from_the_trained_model_stops_the_unit(tmp_path, monkeypatch, method):
    """The fold check (incremental and joint units) compares the trained model's test logits with
    the merged model's; a merge that is off by 0.5 in one logit must fail it, before any write."""
    from pipeline.core import fold
    from pipeline.stages import train

    def off_by_half(base, delta):
        merged = fold.merge(base, delta)
        with torch.no_grad():
            merged.head.bias[0] += 0.5
        return merged

    monkeypatch.setattr(train, "merge", off_by_half)
    out = tmp_path / "out"
    with pytest.raises(train.FoldError, match=r"digits: the merged model differs .* max \|logit difference\| 0\.5"):
        Runner(parse_config(tiny_config(tmp_path, methods=[method])), out, progress=False, log=lambda s: None).run()
    assert not list(out.rglob("delta.safetensors")) and not list(out.rglob("result.json"))
    assert not (out / "bundles").exists()


BROKEN = [
    ({"bogus": 1}, r"cfg\.yaml: bogus: Extra inputs are not permitted"),
    ({"train": {"epochs": "many"}}, r"cfg\.yaml: train\.epochs: Input should be a valid integer"),
    ({"methods": ["nope"]}, r"cfg\.yaml: methods\[0\]\.name: unknown method 'nope'"),
    ({"methods": [{"name": "taps", "lamda": 1}]}, r"cfg\.yaml: methods\[0\]\.lamda: Extra inputs"),
    ({"methods": ["taps", "taps"]}, r"cfg\.yaml: methods\[1\]\.label: repeated label 'taps'"),
    ({"backbone": {"name": "resnet9000"}}, r"cfg\.yaml: backbone\.name: unknown backbone 'resnet9000'"),
    ({"backbone": {"weights": "/no/such.pth"}}, r"cfg\.yaml: backbone\.weights: weights file not found"),
    ({"tasks": [{"name": "x", "source": {"type": "fashion_mnist", "root": "/no/such/dir"}}]},
     r"cfg\.yaml: tasks\[0\]\.source: .*path does not exist: /no/such/dir"),
    ({"tasks": [{"name": "x", "source": {"type": "image_folder"}}]}, r"tasks\[0\]\.source: .*needs 'root'"),
]


@pytest.mark.parametrize("override,message", BROKEN)
def test_broken_config_names_file_and_field(tmp_path, override, message):
    raw = tiny_config(tmp_path)
    raw.update(override)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_cli_reports_config_errors_without_writing(tmp_path, capsys):
    raw = tiny_config(tmp_path)
    raw["train"] = {"lr": -1}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "train.lr: Input should be greater than 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_dataset_files_fail_in_prepare_without_partial_output(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    raw = tiny_config(tmp_path)
    raw["tasks"] = [{"name": "fm", "source": {"type": "fashion_mnist", "root": str(empty)}}]
    with pytest.raises(DataError, match=r"task 'fm': Fashion-MNIST file train-images-idx3-ubyte\(\.gz\) not found"):
        Runner(parse_config(raw), tmp_path / "out", progress=False, log=lambda s: None).run()
    assert not (tmp_path / "out" / "prepared").exists()
    assert not (tmp_path / "out" / "stages").exists()


def test_cli_inspect_prints_the_storage_table(finished_run, capsys):
    _, out = finished_run
    assert main(["inspect", str(out / "bundles" / "taps")]) == 0
    text = capsys.readouterr().out
    assert "every file listed and hashed" in text and "total (N x base)" in text and "digits_neg" in text


def test_runner_resumes_an_interrupted_unit_to_the_same_delta(tmp_path):
    """A unit killed after epoch 1 (its checkpoint left behind) ends with the same bytes."""
    raw = tiny_config(tmp_path, methods=[{"name": "taps", "lam": 1.0}])
    raw["train"]["epochs"] = 3
    raw["tasks"] = raw["tasks"][:1]
    cfg = parse_config(raw)
    quiet = dict(progress=False, log=lambda s: None)
    whole = tmp_path / "whole"
    Runner(cfg, whole, **quiet).run(until="train")

    cut = tmp_path / "cut"
    runner = Runner(cfg, cut, **quiet)
    runner.run(until="prepare")
    unit = cut / "train" / "taps" / "digits"
    m = cfg.methods[0]
    sched = Schedule(3, raw["train"]["batch_size"], raw["train"]["lr"], head_lr_scale=cfg.train.head_lr_scale)
    train_task(runner.ctx.backbone, runner.ctx.data("digits"), build_method("taps", m.params), sched, cfg.run.seed,
               workdir=unit, signature=unit_hash(runner.ctx, m, "digits", {}), progress=False, stop_after_epoch=1)
    assert (unit / "checkpoint.pt").is_file() and not (unit / "delta.safetensors").exists()

    logs = []
    Runner(cfg, cut, progress=False, log=logs.append).run(until="train")
    assert any("resumed from epoch 1" in s for s in logs)
    assert (unit / "delta.safetensors").read_bytes() == (whole / "train/taps/digits/delta.safetensors").read_bytes()
