"""Fault injection, one table: bad configs, bad data files, tampered bundles, diverging training,
broken checkpoints, killed runs' leftovers, full and unwritable disks. Every case asserts the exit
code, that the message names the culprit (field, file, tensor or unit), that nothing outside
the run directory changed, and that no partial artefact is left."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from pipeline.cli import main
from tests.conftest import tiny_config

# ---------------------------------------------------------------- the sandbox


def snapshot(root: Path, skip: Path) -> dict[str, str]:
    """Every file under ``root`` (outside ``skip``) with its content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and skip not in p.parents:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith(".tmp")] if root.exists() else []


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (norm_head and TAPS on two tasks), copied by the cases that tamper."""
    tmp = tmp_path_factory.mktemp("faults")
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp, methods=["norm_head", {"name": "taps", "lam": 1.0}])))
    assert main(["run", str(cfg), "--out", str(tmp / "run"), "--no-progress"]) == 0
    return tmp


class Case:
    def __init__(self, id: str, setup: Callable, code: int, message: str, absent: tuple[str, ...] = ()):
        self.id, self.setup, self.code, self.message, self.absent = id, setup, code, message, absent


# ---------------------------------------------------------------- setups: each returns argv (run dir = tmp/run)


def _config(tmp: Path, over=None, raw=None, **kw) -> list[str]:
    data = raw if raw is not None else tiny_config(tmp, **kw)
    if over:
        over(data)
    path = tmp / "cfg.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return ["run", str(path), "--out", str(tmp / "run"), "--no-progress"]


def config_case(id: str, message: str, code: int = 2, raw=None, **kw) -> Case:
    return Case(id, lambda tmp, finished: _config(tmp, raw=raw, **kw), code, message)


def edit(fn) -> Callable:
    """A setup that edits the tiny config (a dict) in place."""
    return lambda tmp, finished: _config(tmp, over=fn)


def _images(root: Path, n: int = 16) -> list[Path]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def folder_run(tmp: Path, damage: Callable[[list[Path]], None], **over) -> list[str]:
    files = _images(tmp / "data")
    damage(files)
    return _config(tmp, tasks=[{"name": "shapes", "source": {"type": "image_folder", "root": str(tmp / "data")},
                                "val_size": 3}], methods=["linear_probe"], **over)


def truncate(files):
    jpg = next(p for p in files if p.suffix == ".jpg")
    jpg.write_bytes(jpg.read_bytes()[:-60])


def bundle_copy(tmp: Path, finished: Path, label: str = "taps") -> Path:
    dst = tmp / "run" / "bundles" / label
    shutil.copytree(finished / "run" / "bundles" / label, dst)
    return dst


def rehash(bundle: Path, rel: str) -> None:
    """Update the manifest's size and sha256 of ``rel`` (so the next check down is reached)."""
    m = json.loads((bundle / "manifest.json").read_text())
    p = bundle / rel
    m["files"][rel] = {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(m))


def manifest_edit(fn) -> Callable:
    def setup(tmp, finished):
        b = bundle_copy(tmp, finished)
        m = json.loads((b / "manifest.json").read_text())
        out = fn(m, b, tmp)
        (b / "manifest.json").write_text(json.dumps(out if out is not None else m))
        return ["inspect", str(b)]
    return setup


def file_edit(fn, rel: str = "tasks/digits.safetensors", rehash_after: bool = True) -> Callable:
    def setup(tmp, finished):
        b = bundle_copy(tmp, finished)
        fn(b / rel, tmp, finished)
        if rehash_after:
            rehash(b, rel)
        return ["inspect", str(b)]
    return setup


def flip_byte(p, tmp, finished):
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))


def pickle_file(p, tmp, finished):
    torch.save({"head::head::weight": torch.zeros(2, 2)}, p)


def huge_header(p, tmp, finished):
    p.write_bytes(struct.pack("<Q", 2**60) + b"{}")


def nan_tensor(p, tmp, finished):
    from safetensors.torch import safe_open

    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata()
    t = load_file(str(p))
    k = next(k for k in t if k.startswith("head::"))
    t[k].view(-1)[0] = math.nan
    save_file(t, str(p), metadata=meta)


def other_backbone_delta(p, tmp, finished):
    """A delta of the same tasks trained for another width of the tiny convnet."""
    from pipeline.core.backbones import build_backbone
    from pipeline.core.delta import write_delta
    from pipeline.methods import build_method

    bb = build_backbone("tiny_convnet", "none", {"width": 12})
    method = build_method("norm_head")
    model = bb.task_net(10)
    method.prepare(model)
    d = method.task_delta(model, "digits")
    d.method = "taps"
    write_delta(p, d)


def garbage_base(p, tmp, finished):
    p.write_bytes(os.urandom(2048))


def absolute_task_file(m, b, tmp):
    m["tasks"]["digits"]["file"] = str((b / "tasks" / "digits_neg.safetensors").resolve())


def dotdot_file(m, b, tmp):
    m["files"]["../outside.safetensors"] = m["files"].pop("tasks/digits.safetensors")


def unlisted(m, b, tmp):
    (b / "tasks" / "extra.safetensors").write_bytes(b"x")


def dropped_from_files(m, b, tmp):
    del m["files"]["tasks/digits.safetensors"]


def not_an_object(m, b, tmp):
    return [1, 2, 3]


def lacks_tasks(m, b, tmp):
    del m["tasks"]


def ledger_changed(m, b, tmp):
    m["ledger"]["total"]["n_x_base"] = 0.01


def kwargs_file(m, b, tmp):
    m["backbone"]["kwargs"] = {"pretrained_cfg_overlay": {"file": "/etc/passwd"}}


def classes_changed(m, b, tmp):
    m["tasks"]["digits"]["num_classes"] = 3
    m["tasks"]["digits"].pop("classes", None)


def class_names_changed(m, b, tmp):
    m["tasks"]["digits"]["classes"] = ["zero", "one"]


def symlink(m, b, tmp):
    (b / "tasks" / "link.safetensors").symlink_to(b / "tasks" / "digits.safetensors")


def finished_copy(tmp: Path, finished: Path) -> Path:
    shutil.copytree(finished / "run", tmp / "run")
    shutil.copy(finished / "cfg.yaml", tmp / "cfg.yaml")
    return tmp / "run"


def changed_bundle_file(tmp, finished):
    run = finished_copy(tmp, finished)
    flip_byte(run / "bundles" / "taps" / "tasks" / "digits.safetensors", tmp, finished)
    return ["run", str(tmp / "cfg.yaml"), "--out", str(run), "--no-progress", "--until", "fold"]


def corrupt_checkpoint(tmp, finished):
    argv = _config(tmp, methods=["linear_probe"])
    unit = tmp / "run" / "train" / "linear_probe" / "digits"
    unit.mkdir(parents=True)
    (unit / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    return argv + ["--until", "train"]


def dead_leftovers(tmp, finished):
    run = finished_copy(tmp, finished)
    dead = 2**22 + 12345  # above any pid this machine hands out
    host = "".join(c if c.isalnum() or c in "_-" else "_" for c in socket.gethostname())
    (run / "train" / "taps" / "digits" / f".delta.safetensors.{host}-{dead}.abcd1234.tmp").write_bytes(b"half")
    (run / "exports" / f".shared.{host}-{dead}.zz99.tmp").mkdir(parents=True)
    return ["run", str(tmp / "cfg.yaml"), "--out", str(run), "--no-progress"]


def full_disk(monkeypatch):
    import pipeline.core.io as io

    real = io.os.replace

    def replace(src, dst):
        if str(dst).endswith("delta.safetensors"):
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)


def unwritable(monkeypatch):
    import pipeline.core.io as io

    def mkstemp(*a, dir=None, **k):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(io.tempfile, "mkstemp", mkstemp)


CASES = [
    # configs: field named, nothing written
    config_case("label-escapes", r"methods\[0\]\.label: '\.\./\.\./\.\./victim' cannot be a method label",
                methods=[{"name": "finetune", "label": "../../../victim"}]),
    config_case("label-absolute", r"methods\[0\]\.label: '/tmp/x' cannot be", methods=[{"name": "finetune", "label": "/tmp/x"}]),
    config_case("task-dotdot", r"tasks\[0\]\.name: '\.\.' cannot be a task name",
                tasks=[{"name": "..", "source": {"type": "digits"}}]),
    config_case("task-separator", r"tasks\[0\]\.name: 'a/b' cannot be a task name",
                tasks=[{"name": "a/b", "source": {"type": "digits"}}]),
    config_case("method-lr-zero", r"methods\[0\]\.lr: Input should be greater than 0", methods=[{"name": "finetune", "lr": 0}]),
    config_case("method-lr-negative", r"methods\[0\]\.lr: Input should be greater than 0",
                methods=[{"name": "finetune", "lr": -1}]),
    config_case("method-epochs-zero", r"methods\[0\]\.epochs: Input should be greater than or equal to 1",
                methods=[{"name": "finetune", "epochs": 0}]),
    config_case("method-epochs-negative", r"methods\[0\]\.epochs: Input should be greater than or equal to 1",
                methods=[{"name": "finetune", "epochs": -2}]),
    Case("train-epochs-zero", edit(lambda d: d["train"].update(epochs=0)), 2, r"train\.epochs: Input should be greater"),
    Case("bench-batch-zero", edit(lambda d: d["bench"].update(batch_sizes=[0])), 2, r"bench\.batch_sizes: batch sizes must"),
    Case("bench-batch-empty", edit(lambda d: d["bench"].update(batch_sizes=[])), 2, r"bench\.batch_sizes: List should have"),
    Case("bench-runs-zero", edit(lambda d: d["bench"].update(runs=0)), 2, r"bench\.runs: Input should be greater"),
    Case("export-unknown-form", edit(lambda d: d["export"].update(forms=["nope"])), 2, r"export\.forms: .*unknown deployment form"),
    Case("export-forms-without-onnx", edit(lambda d: d["export"].update(onnx=False, forms=["shared"])), 2,
         r"export\.forms: deployment forms are built from the ONNX exports"),
    Case("backbone-kwarg", edit(lambda d: d["backbone"].update(kwargs={"bogus": 1})), 2,
         r"backbone\.kwargs \{'bogus': 1\}: tiny_convnet does not take them"),
    Case("device-string", edit(lambda d: d.update(run={"device": "gpu"})), 2, r"run\.device: String should match"),
    Case("precision", edit(lambda d: d.update(run={"precision": "fp8"})), 2, r"run\.precision: Input should be"),
    Case("on-bad-image", edit(lambda d: d.update(data={"on_bad_image": "ignore"})), 2, r"data\.on_bad_image: Input should be"),
    Case("augment", edit(lambda d: d["train"].update(augment="bogus")), 2, r"train\.augment: 'bogus' is not"),
    Case("checks-negative", edit(lambda d: d.update(checks={"onnx_max_abs_diff": -1})), 2,
         r"checks\.onnx_max_abs_diff: Input should be greater than 0"),
    config_case("yaml-syntax", r"cfg\.yaml: not valid YAML", raw="run: [unclosed\n"),
    config_case("not-a-mapping", r"cfg\.yaml: <top>: expected a mapping", raw="- a\n- b\n"),
    Case("config-missing", lambda tmp, f: ["run", str(tmp / "nope.yaml"), "--out", str(tmp / "run")], 2,
         r"nope\.yaml: config file not found"),
    Case("methods-not-a-list", edit(lambda d: d.update(methods="finetune")), 2, r"methods: expected a non-empty list"),
    Case("repeated-label", edit(lambda d: d.update(methods=["taps", "taps"])), 2, r"methods\[1\]\.label: repeated label"),
    Case("unknown-section", edit(lambda d: d.update(bogus=1)), 2, r"bogus: Extra inputs are not permitted"),
    Case("val-size-negative", edit(lambda d: d["tasks"][0].update(val_size=-1)), 2, r"tasks\[0\]\.val_size: Input should be"),
    Case("out-is-a-file", lambda tmp, f: (tmp / "file").write_text("x") and
         _config(tmp)[:-3] + ["--out", str(tmp / "file")], 2, r"--out .*file: exists and is not a folder"),
    Case("shard-out-of-range", lambda tmp, f: _config(tmp) + ["--shard=2/2"], 2, r"--shard '2/2': needs 0 <= I < N"),
    # data files
    Case("truncated-jpeg", lambda tmp, f: folder_run(tmp, truncate), 2,
         r"data/c1/\d+\.jpg: cannot decode image .*task 'shapes', split '(train|val|test)'", absent=("bundles",)),
    Case("text-as-jpg", lambda tmp, f: folder_run(tmp, lambda fs: fs[1].write_text("not an image")), 2,
         r"data/c1/1\.jpg: not a readable image .*task 'shapes', (train|test) split", absent=("prepared",)),
    Case("empty-folder", lambda tmp, f: folder_run(tmp, lambda fs: [p.unlink() for p in fs]), 2,
         r"task 'shapes': .*data: not an image folder", absent=("prepared",)),
    Case("file-list-split", lambda tmp, f: (tmp / "l.csv").write_text("a.png,1,holdout\n") and _config(
        tmp, tasks=[{"name": "l", "source": {"type": "file_list", "root": str(tmp / "l.csv")}}]), 2,
         r"task 'l': .*l\.csv: unknown split\(s\) \['holdout'\]"),
    Case("file-list-missing-image", lambda tmp, f: _images(tmp / "img", 8) and (tmp / "l.csv").write_text(
        "\n".join(f"img/c{i % 2}/{i}.{'jpg' if i % 2 else 'png'},{i % 2}" for i in range(8)) + "\nimg/gone.png,0\n")
         and _config(tmp, tasks=[{"name": "l", "source": {"type": "file_list", "root": str(tmp / "l.csv")},
                                  "val_size": 2}]), 2, r"img/gone\.png: not a readable image .*task 'l'"),
    Case("idx-corrupt", lambda tmp, f: [(tmp / "fm").mkdir(), *[(tmp / "fm" / n).write_bytes(b"\x00\x00") for n in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]]
         and _config(tmp, tasks=[{"name": "fm", "source": {"type": "fashion_mnist", "root": str(tmp / "fm")}}]), 2,
         r"task 'fm': .*train-images-idx3-ubyte: not a readable IDX file"),
    # tampered bundles
    Case("bundle-flipped-byte", file_edit(flip_byte, rehash_after=False), 2, r"digits\.safetensors: sha256 does not match"),
    Case("bundle-task-file-absolute", manifest_edit(absolute_task_file), 2,
         r"tasks\.digits\.file: .*a task's file is 'tasks/digits\.safetensors'"),
    Case("bundle-files-dotdot", manifest_edit(dotdot_file), 2, r"files: lists \['\.\./outside\.safetensors'\]"),
    Case("bundle-unlisted-file", manifest_edit(unlisted), 2, r"tasks/extra\.safetensors: not listed in the manifest"),
    Case("bundle-dropped-from-files", manifest_edit(dropped_from_files), 2,
         r"files: does not list \['tasks/digits\.safetensors'\]"),
    Case("bundle-pickle", file_edit(pickle_file), 2, r"digits\.safetensors: not a readable task delta"),
    Case("bundle-huge-header", file_edit(huge_header), 2, r"digits\.safetensors: not a readable task delta"),
    Case("bundle-other-backbone", file_edit(other_backbone_delta), 2,
         r"digits\.safetensors: entry 'features\.\w+' \(norm\) does not fit backbone 'tiny_convnet'"),
    Case("bundle-manifest-list", manifest_edit(not_an_object), 2, r"manifest\.json: expected a JSON object, found list"),
    Case("bundle-manifest-no-tasks", manifest_edit(lacks_tasks), 2, r"manifest\.json: tasks: Field required"),
    Case("bundle-garbage-base", file_edit(garbage_base, rel="base.safetensors"), 2,
         r"base\.safetensors: not a readable safetensors file"),
    Case("bundle-ledger", manifest_edit(ledger_changed), 2, r"manifest\.json: the ledger does not match"),
    Case("bundle-nan", file_edit(nan_tensor), 2, r"digits\.safetensors: tensor head::head::\w+ has non-finite values"),
    Case("bundle-kwargs-file", manifest_edit(kwargs_file), 2,
         r"backbone\.kwargs: .*kwargs\.pretrained_cfg_overlay: a bundle may not set"),
    Case("bundle-classes", manifest_edit(classes_changed), 2, r"entry 'head' is \(10, 16\), expected \(classes, features\) \(3, 16\)"),
    Case("bundle-class-names", manifest_edit(class_names_changed), 2,
         r"manifest\.json: tasks\.digits\.classes names 2 classes, num_classes is 10"),
    Case("bundle-symlink", manifest_edit(symlink), 2, r"link\.safetensors: a link inside the bundle"),
    Case("inspect-not-a-bundle", lambda tmp, f: (tmp / "run").mkdir() or ["inspect", str(tmp / "run")], 2,
         r"manifest\.json: not found; is .* a taskfold bundle"),
    # training
    Case("diverging-lr", lambda tmp, f: _config(tmp, methods=[{"name": "finetune", "lr": 1000000}],
                                                train={"epochs": 2, "batch_size": 32, "lr": 0.05}), 2,
         r"finetune/digits: .*(not finite|loss is (nan|inf)).*lr 1e\+06, from methods\[0\]\.lr", absent=("bundles",)),
    Case("corrupt-checkpoint", corrupt_checkpoint, 0, r"checkpoint\.pt: checkpoint of unreadable"),
    # run directories
    Case("changed-bundle-file", changed_bundle_file, 0, r"fold: bundles/taps/tasks/digits\.safetensors changed since"),
    Case("killed-run-leftovers", dead_leftovers, 0, r"removed 2 temp file\(s\) left by a killed run"),
    Case("bench-name", lambda tmp, f: finished_copy(tmp, f) and ["bench", str(tmp / "run"), "--name", "../x"], 2,
         r"--name: '\.\./x' cannot be a measurement name"),
    Case("bench-runs", lambda tmp, f: finished_copy(tmp, f) and ["bench", str(tmp / "run"), "--runs", "0"], 2,
         r"--runs 0: must be >= 1"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(case: Case, tmp_path, finished, capsys):
    (tmp_path / "outside" / "victim").mkdir(parents=True)
    (tmp_path / "outside" / "victim" / "keep.txt").write_text("precious")
    argv = case.setup(tmp_path, finished)
    run = tmp_path / "run"
    before = snapshot(tmp_path, run)
    code = main(argv)
    out = capsys.readouterr()
    text = out.err + out.out
    assert code == case.code, text[-2000:]
    import re

    assert re.search(case.message, text), text[-2000:]
    if case.code:
        assert "Traceback" not in text
    assert snapshot(tmp_path, run) == before  # nothing outside the run directory changed
    assert not leftovers(run)  # no temp file or half-written artefact
    for rel in case.absent:
        assert not (run / rel).exists(), rel


@pytest.mark.parametrize("fault", [full_disk, unwritable], ids=["disk-full", "unwritable"])
def test_a_failing_disk_is_named_and_leaves_nothing_half_written(fault, tmp_path, monkeypatch, capsys):
    argv = _config(tmp_path, methods=["linear_probe"])
    fault(monkeypatch)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re_search(r"taskfold: error: cannot write or read .*(run|delta)", err) and "Traceback" not in err
    run = tmp_path / "run"
    assert not leftovers(run) and not list(run.rglob("delta.safetensors"))


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


def test_outputs_get_the_modes_a_plain_write_would(tmp_path):
    from pipeline.core.io import atomic_dir, atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "f.json") as t:
            t.write_text("{}")
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_a_run_directory_on_another_filesystem_than_tmp(tmp_path, monkeypatch):
    """Every temp file lives beside its destination: with TMPDIR on another filesystem (tmpfs),
    the INT8 form (the one that renamed a temp file across filesystems) is written."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem to put TMPDIR on here")
    other = Path(shm) / f"taskfold-tmp-{os.getpid()}"
    other.mkdir(exist_ok=True)
    # libraries that put their own files in the temp folder once per process (onnxruntime on
    # import, torch's compile cache) do so before the switch, as any earlier test would have
    import onnxruntime  # noqa: F401
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    cache_dir()
    # importing onnxruntime writes a file of its own there in every process (``.ses``), the
    # export's worker processes included: what a bare process leaves is the library's, not ours
    subprocess.run([sys.executable, "-c", "import onnxruntime"], env={**os.environ, "TMPDIR": str(other)}, check=True)
    libraries = set(other.iterdir())
    monkeypatch.setenv("TMPDIR", str(other))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    try:
        argv = _config(tmp_path, methods=["norm_head"], export={"forms": ["int8"], "calibration_images": 8})
        assert main(argv) == 0
        assert list((tmp_path / "run" / "exports" / "norm_head").glob("*.int8.onnx"))
        assert set(other.iterdir()) <= libraries  # and nothing of ours was left in the system's temp folder
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_the_table_has_at_least_forty_cases():
    assert len(CASES) >= 40
