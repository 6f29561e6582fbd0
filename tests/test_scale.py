"""Training at scale, tested small: precision, devices, torchrun with 2 CPU processes (gloo), a
killed 2-process run resuming, several jobs on one run directory, and the dry run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.config import ConfigError, parse_config
from pipeline.core.fold import compare, merge
from pipeline.methods import build_method
from pipeline.methods.context import Schedule
from pipeline.stages.runner import Runner
from pipeline.training.incremental import train_task
from pipeline.training.runtime import DeviceError, Runtime
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def _cfg_file(tmp_path, name="cfg.yaml", **over) -> Path:
    raw = tiny_config(tmp_path, **over)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _taskfold(*args, procs: int = 1, timeout: float = 240, **popen) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([*launcher, "-m", "pipeline", "run", *map(str, args), "--no-progress"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            **popen)


def _done(p: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-3000:]
    return out


# ---------------------------------------------------------------- precision and devices


def test_bf16_autocast_on_cpu_trains_and_folds_in_float32(digits16):
    from pipeline.core.backbones import build_backbone

    bb = build_backbone("tiny_convnet", "none")
    sched = Schedule(epochs=2, batch_size=32, lr=0.05)
    runs = {}
    for precision in ("fp32", "bf16"):
        method = build_method("taps")
        out = train_task(bb, digits16, method, sched, seed=0, progress=False, runtime=Runtime(precision=precision))
        delta = method.task_delta(out.model, "digits")
        assert all(t.dtype == torch.float32 for t in delta.flat_tensors().values())  # stored as float32
        check = compare(out.model, merge(bb.base_net(), delta), digits16.test.inputs())
        assert check["max_abs_diff"] < 1e-5 and check["argmax_agree"] == 1.0  # the fold is exact in float32
        runs[precision] = delta.flat_tensors()
        assert all(torch.isfinite(h["train_loss"]) if isinstance(h["train_loss"], torch.Tensor)
                   else h["train_loss"] == h["train_loss"] for h in out.history)
    # autocast really ran: bf16 matmuls round differently from fp32 ones
    assert any(not torch.equal(runs["fp32"][k], runs["bf16"][k]) for k in runs["fp32"])


def test_precision_bf16_through_the_runner(tmp_path):
    cfg = parse_config(tiny_config(tmp_path, methods=["norm_head"], run={"precision": "bf16"}))
    Runner(cfg, tmp_path / "run", progress=False, log=lambda s: None).run(until="fold")
    assert (tmp_path / "run" / "bundles" / "norm_head" / "manifest.json").is_file()


@pytest.mark.parametrize("device, message", [("gpu", r"run\.device: String should match pattern"),
                                             ("cuda:x", r"run\.device: String should match pattern")])
def test_a_bad_device_string_is_a_config_error(tmp_path, device, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(tiny_config(tmp_path, run={"device": device}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error_before_any_work(tmp_path):
    cfg = parse_config(tiny_config(tmp_path, run={"device": "cuda"}))
    with pytest.raises(DeviceError, match=r"run\.device: 'cuda' asked for, but torch sees no CUDA GPU"):
        Runner(cfg, tmp_path / "run", progress=False, log=lambda s: None).run()
    assert not (tmp_path / "run").exists()


@CUDA
def test_a_bundle_trained_on_the_gpu_exports_on_the_cpu(tmp_path):
    cfg = parse_config(tiny_config(tmp_path, methods=["taps"], run={"device": "cuda", "precision": "bf16"}))
    Runner(cfg, tmp_path / "run", progress=False, log=lambda s: None).run()
    d = load_file(str(tmp_path / "run" / "train" / "taps" / "digits" / "delta.safetensors"))
    assert all(t.device.type == "cpu" for t in d.values())


# ---------------------------------------------------------------- torchrun: 2 processes on the CPU

DDP_METHODS = ["linear_probe", {"name": "ftn", "rank": 2, "task_norms": False}, "finetune",
               {"name": "joint_finetune"}]
# 5x5 depthwise kernels on 4x4 maps: their weight gradients go through taskfold's CPU kernel
# (pipeline.training.depthwise; tests/test_depthwise.py checks that this backbone routes)
ROUTED = {"name": "tiny_convnet", "weights": "none", "image_size": 8, "kwargs": {"dw_kernel": 5}}


@pytest.fixture(scope="module")
def one_and_two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = _cfg_file(tmp, methods=DDP_METHODS, backbone=ROUTED, train={"epochs": 2, "batch_size": 32, "lr": 0.05})
    one = _taskfold(cfg, "--out", tmp / "one")
    two = _taskfold(cfg, "--out", tmp / "two", procs=2)
    return tmp, cfg, _done(one), _done(two)


def _delta(run: Path, label: str, task: str = "digits") -> dict:
    return load_file(str(run / "train" / label / task / "delta.safetensors"))


def test_two_ranks_give_the_one_rank_delta(one_and_two_ranks):
    """Each of 2 processes takes every other image of a batch of 32 (16 each) and the gradients
    are averaged: the same gradient as one process with the whole batch, up to the order of
    float additions. Exact for methods whose BatchNorm stays in eval mode (linear probe, FTN with
    frozen norms); a method that trains norms in train mode sees per-process batch statistics
    (16 images, not 32), which ``train.sync_bn`` (CUDA) makes global."""
    tmp, _, _, log_two = one_and_two_ranks
    for label in ("linear_probe", "ftn"):
        a, b = _delta(tmp / "one", label), _delta(tmp / "two", label)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), (label, k, (a[k] - b[k]).abs().max())
    a, b = _delta(tmp / "one", "finetune"), _delta(tmp / "two", "finetune")
    assert any(not torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)  # BatchNorm: not exact, as said
    # one process spoke; the later stages ran once and every entry has its bundle
    assert log_two.count("taskfold run") == 1
    for label in ("linear_probe", "ftn", "finetune", "joint_finetune"):
        assert (tmp / "two" / "bundles" / label / "manifest.json").is_file()
    assert (tmp / "two" / "report.md").is_file()


def test_a_killed_two_rank_run_resumes_to_the_same_delta(one_and_two_ranks, tmp_path):
    tmp, _, _, _ = one_and_two_ranks
    # epochs long enough (~28 steps) that the kill lands between the first checkpoint and the end
    cfg = _cfg_file(tmp_path, methods=[{"name": "ftn", "rank": 2, "task_norms": False}], backbone=ROUTED,
                    tasks=[{"name": "digits", "source": {"type": "digits"}, "train_size": 900, "val_size": 32,
                            "test_size": 48}],
                    train={"epochs": 4, "batch_size": 32, "lr": 0.05})
    whole = tmp_path / "whole"
    _done(_taskfold(cfg, "--out", whole, "--until", "train", procs=2))
    cut = tmp_path / "cut"
    p = _taskfold(cfg, "--out", cut, "--until", "train", procs=2)
    ckpt = cut / "train" / "ftn" / "digits" / "checkpoint.pt"
    deadline = time.time() + 180
    while not ckpt.is_file() and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    _kill_tree(p.pid)  # torchrun and both ranks (each in a session of its own), mid-run
    p.communicate()
    assert ckpt.is_file() and not (cut / "train" / "ftn" / "digits" / "delta.safetensors").exists()
    log = _done(_taskfold(cfg, "--out", cut, "--until", "train", procs=2))
    assert "resumed from epoch" in log
    a, b = _delta(whole, "ftn"), _delta(cut, "ftn")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (read from /proc), the way a node failure would."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------- many jobs on one run directory


def _trainings(logs: list[str]) -> list[str]:
    return [line.split(":")[0].removeprefix("train ") for log in logs for line in log.splitlines()
            if line.startswith("train ") and " epochs, " in line]


def test_two_concurrent_jobs_train_each_unit_once_and_give_the_same_bundles(tmp_path):
    methods = ["linear_probe", "norm_head", {"name": "cwps", "lam": 0.5}, {"name": "ftn", "rank": 2}]
    cfg = _cfg_file(tmp_path, methods=methods)
    single = tmp_path / "single"
    _done(_taskfold(cfg, "--out", single, "--until", "fold"))
    shared = tmp_path / "shared"
    jobs = [_taskfold(cfg, "--out", shared, "--stage", "train") for _ in range(2)]
    logs = [_done(j) for j in jobs]
    logs.append(_done(_taskfold(cfg, "--out", shared, "--until", "fold")))  # trains what was left, then folds
    trained = _trainings(logs)
    assert sorted(trained) == sorted(set(trained)) and len(trained) == 4 * 2  # every unit once
    for label in ("linear_probe", "norm_head", "cwps", "ftn"):
        for task in ("digits", "digits_neg"):
            a = (single / "bundles" / label / "tasks" / f"{task}.safetensors").read_bytes()
            b = (shared / "bundles" / label / "tasks" / f"{task}.safetensors").read_bytes()
            assert a == b, (label, task)


def test_shards_split_the_units_and_stop_after_training(tmp_path):
    cfg = _cfg_file(tmp_path, methods=["linear_probe", "norm_head"])
    out = tmp_path / "run"
    logs = [_done(_taskfold(cfg, "--out", out, "--shard", f"{i}/2")) for i in range(2)]
    assert sorted(_trainings(logs)) == sorted(f"{m}/{t}" for m in ("linear_probe", "norm_head")
                                              for t in ("digits", "digits_neg"))
    assert all("stops after the train stage" in log for log in logs) and not (out / "bundles").exists()
    final = _done(_taskfold(cfg, "--out", out))
    assert not _trainings([final]) and (out / "report.md").is_file()


def test_a_unit_held_by_a_live_job_is_left_to_it_and_a_dead_jobs_lock_is_taken_over(tmp_path):
    import json
    import socket

    cfg = parse_config(tiny_config(tmp_path, methods=["linear_probe"]))
    out = tmp_path / "run"
    unit = out / "train" / "linear_probe" / "digits"
    unit.mkdir(parents=True)
    (unit / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}))
    logs = []
    runner = Runner(cfg, out, progress=False, log=logs.append)
    runner.run()
    assert any(s.startswith("train linear_probe/digits: being trained by another job") and str(os.getpid()) in s
               for s in logs)
    assert runner.ctx.pending == ["linear_probe/digits"] and not (out / "bundles").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (unit / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "time": 0}))
    logs.clear()
    Runner(cfg, out, progress=False, log=logs.append).run()
    assert any("taking over a stale lock" in s for s in logs) and (out / "report.md").is_file()
    assert not (unit / ".lock").exists()


@pytest.mark.parametrize("shard", ["3/2", "x", "1/0", "-1/2"])
def test_a_shard_out_of_range_is_named(tmp_path, capsys, shard):
    cfg = _cfg_file(tmp_path)
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), f"--shard={shard}"]) == 2
    assert f"--shard {shard!r}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the papers' configs, without their data


@pytest.mark.parametrize("example", ["domainnet_resnet50.yaml", "imagenet_to_sketch.yaml"])
def test_the_papers_configs_dry_run_without_their_data(capsys, example):
    code = main(["run", str(ROOT / "examples" / example), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 3  # valid config, data absent: not the invalid-config code (2)
    assert "the config is valid" in out and "does not exist" in out and "peak memory per process" in out
    assert "finetune/" in out and "torchvision:resnet50 at 224 px" in out


def test_a_dry_run_reports_units_images_and_steps(tmp_path, capsys):
    cfg = _cfg_file(tmp_path, methods=["finetune", {"name": "cwps", "passes": 2}], train={"epochs": 3, "batch_size": 32})
    assert main(["run", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "task digits: 10 classes, images train 96, val 32, test 48" in out
    assert "finetune/digits (finetune): 3 epochs, 9 steps" in out and "cwps/digits (cwps, 2 passes)" in out
    raw = yaml.safe_load(cfg.read_text())
    raw["train"]["epochs"] = 0
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["run", str(cfg), "--dry-run"]) == 2  # an invalid config is still an invalid config


# ---------------------------------------------------------------- run.jobs: helper processes


def _jobs_config(tmp_path, jobs: int, methods) -> dict:
    return tiny_config(tmp_path, run={"threads": 1, "jobs": jobs}, methods=methods)


def test_run_jobs_trains_every_unit_once_in_two_processes_and_gives_the_one_process_bundles(tmp_path):
    # a pool chain (CWPS), a joint unit and an entry that waits for it: the helper visits them
    # first (it goes from the last entry back), so the main process must wait and finish after it
    methods = ["linear_probe", {"name": "cwps", "lam": 0.5}, "joint_finetune",
               {"name": "taps", "label": "taps_from_joint", "base": "joint_finetune", "lam": 1.0}, "norm_head"]
    single, shared = tmp_path / "single", tmp_path / "shared"
    Runner(parse_config(_jobs_config(tmp_path, 1, methods)), single, progress=False, log=lambda s: None).run(until="fold")
    main_log: list[str] = []
    Runner(parse_config(_jobs_config(tmp_path, 2, methods)), shared, progress=False, log=main_log.append).run(until="fold")
    helper_log = (shared / "train" / "jobs" / "job1.log").read_text()
    trained = _trainings(["\n".join(main_log), helper_log])
    units = [f"{m}/{t}" for m in ("linear_probe", "cwps", "taps_from_joint", "norm_head")
             for t in ("digits", "digits_neg")] + ["joint_finetune"]
    assert sorted(trained) == sorted(units)  # every unit once, by one process or the other
    assert _trainings([helper_log]) and _trainings(["\n".join(main_log)])  # both processes trained
    assert torch.get_num_threads() >= 1
    for label in ("linear_probe", "cwps", "joint_finetune", "taps_from_joint", "norm_head"):
        for task in ("digits", "digits_neg"):
            a = load_file(str(single / "bundles" / label / "tasks" / f"{task}.safetensors"))
            b = load_file(str(shared / "bundles" / label / "tasks" / f"{task}.safetensors"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (label, task)
    # run again: every unit is up to date, so no helper is started
    again: list[str] = []
    Runner(parse_config(_jobs_config(tmp_path, 2, methods)), shared, progress=False, log=again.append).run(until="train")
    assert not any("processes (run.jobs)" in line for line in again)
    assert (shared / "train" / "jobs" / "job1.log").read_text() == helper_log
    assert not _trainings(["\n".join(again)])


def test_a_unit_failing_in_either_process_stops_the_run_and_leaves_no_helper(tmp_path):
    import multiprocessing

    from pipeline.core.errors import TaskfoldError

    # both units of the last entry diverge; the helper starts there, the main process may get there too
    methods = ["linear_probe", {"name": "finetune", "label": "diverges", "lr": 1e6}]
    out = tmp_path / "run"
    with pytest.raises(TaskfoldError, match=r"(?s)finetune/digits(_neg)?: .*(not finite|loss is nan).*lower methods\[1\]\.lr"):
        Runner(parse_config(_jobs_config(tmp_path, 2, methods)), out, progress=False, log=lambda s: None).run(until="train")
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("taskfold-train")]
    assert not list(out.rglob(".lock"))


def test_a_failing_helper_is_named_with_its_own_error_and_log(tmp_path):
    from pipeline.stages import helpers
    from pipeline.stages.jobs import Selection

    # data that is gone by the time the helper reads it: the helper fails, the main process says so
    cfg = tiny_config(tmp_path, tasks=[{"name": "gone", "source": {"type": "image_folder", "root": str(tmp_path / "gone")}}])
    with pytest.raises(helpers.HelperError) as err:  # before the main process trains anything
        helpers.start(parse_config(cfg, check_paths=False), tmp_path / "run", Selection(), 2, tmp_path / "logs")
    text = str(err.value)
    assert "training helper 1 exited with 1" in text and str(tmp_path / "logs" / "job1.log") in text
    assert "error: " in text and "gone" in text  # the helper's own last lines


def test_run_jobs_under_torchrun_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    from pipeline.stages.context import StageContext
    from pipeline.stages.rundir import RunDir

    ctx = StageContext(parse_config(_jobs_config(tmp_path, 2, ["linear_probe"])), RunDir(tmp_path / "run"))
    with pytest.raises(DeviceError, match="run.jobs"):
        ctx.runtime
