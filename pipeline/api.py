"""The Python API: what the CLI does, from a script.

    import pipeline

    results = pipeline.run("examples/quickstart.yaml", out="runs/quickstart")   # or a dict, or a RunConfig
    bundle = pipeline.load_bundle("runs/quickstart/bundles/taps")               # verified, see core.verify
    model = bundle.model("fmnist")              # a plain torch module: the merged model, its preprocessing on it
    bundle.predict("fmnist", ["shirt.png"], k=3)  # [[{"label": "Shirt", "index": 6, "probability": 0.81}, ...]]

    import exporters
    exporters.export(bundle, "deploy/", forms=["shared", "int8"], calibration=...)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from pipeline.core.backbones import TaskNet
from pipeline.core.bundle import Bundle
from pipeline.core.bundle import load_bundle as _load_verified
from pipeline.data.transforms import Preprocess, ToInput


class TaskModel(TaskNet):
    """A task's merged model: a plain ``TaskNet`` (features -> head) that also knows how its
    inputs are made (``preprocess``: PIL images, paths or uint8 tensors -> input batch) and what
    its classes are called."""

    def __init__(self, net: TaskNet, preprocess: ToInput, classes: list[str], task: str):
        super().__init__(net.features, net.head)
        self.preprocess = preprocess
        self.classes = classes
        self.task = task

    def inputs(self, images: Iterable) -> torch.Tensor:
        """Paths, PIL images or uint8 tensors (C, H, W) -> the normalised input batch."""
        from PIL import Image

        out = []
        for img in images:
            if isinstance(img, (str, Path)):
                with Image.open(img) as f:
                    img = f.convert("RGB")
            elif isinstance(img, Image.Image):
                img = img.convert("RGB")
            out.append(self.preprocess(img, 0))
        return torch.stack(out)


class LoadedBundle:
    """A verified bundle, with models and predictions per task."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        b = bundle.manifest["backbone"]
        self.preprocess = Preprocess(b["image_size"], tuple(b["mean"]), tuple(b["std"]),
                                     b.get("interpolation", "bilinear"), float(b.get("crop_pct", 0.875)))
        self._models: dict[str, TaskModel] = {}

    @property
    def root(self) -> Path:
        return self.bundle.root

    @property
    def tasks(self) -> list[str]:
        return self.bundle.tasks

    @property
    def ledger(self) -> dict:
        """The storage ledger, recomputed from the bundle's files."""
        return self.bundle.ledger

    @property
    def manifest(self) -> dict:
        return self.bundle.manifest

    def classes(self, task: str) -> list[str]:
        names = self.bundle.classes(task)
        n = self.bundle.manifest["tasks"][task]["num_classes"]
        return list(names) if names else [str(i) for i in range(n)]

    def model(self, task: str) -> TaskModel:
        """The task's merged model (eval mode), with its preprocessing and class names."""
        if task not in self._models:
            rec = self.bundle.manifest["tasks"].get(task)
            if rec is None:
                raise KeyError(f"no task {task!r} in {self.root}; tasks: {self.tasks}")
            transform = ToInput(self.preprocess, crop_pct=rec.get("crop_pct"))
            self._models[task] = TaskModel(self.bundle.merged(task), transform, self.classes(task), task).eval()
        return self._models[task]

    @torch.no_grad()
    def predict(self, task: str, images: Sequence, k: int = 5) -> list[list[dict[str, Any]]]:
        """Top-``k`` classes per image (paths, PIL images or uint8 tensors), most likely first."""
        model = self.model(task)
        probs = model(model.inputs(images)).softmax(-1)
        top = probs.topk(min(k, probs.shape[1]), dim=1)
        return [[{"label": model.classes[i], "index": int(i), "probability": float(p)} for p, i in
                 zip(row_p.tolist(), row_i.tolist())] for row_p, row_i in zip(top.values, top.indices)]


def load_bundle(path: str | Path, expect_backbone: str | None = None) -> LoadedBundle:
    """Open and verify a bundle (``taskfold inspect`` does the same checks)."""
    return LoadedBundle(_load_verified(Path(path), expect_backbone))


def run(config, out: str | Path | None = None, until: str = "report", force: Sequence[str] = (),
        progress: bool = False, log=print) -> dict:
    """Run a config (a YAML path, a dict as the YAML would give, or a ``RunConfig``) through the
    stages into ``out`` (default ``runs/<config name>``); returns results.json's content."""
    from pipeline.config import RunConfig, load_config, parse_config
    from pipeline.stages.runner import Runner

    if isinstance(config, RunConfig):
        cfg, name = config, "run"
    elif isinstance(config, dict):
        cfg, name = parse_config(config), "run"
    else:
        cfg, name = load_config(config), Path(config).stem
    out = Path(out) if out is not None else Path("runs") / name
    runner = Runner(cfg, out, progress=progress, log=log)
    runner.run(until=until, force=tuple(force))
    results = runner.run_dir.results_file
    return json.loads(results.read_text()) if until == "report" and results.is_file() else {}


__all__ = ["load_bundle", "run", "LoadedBundle", "TaskModel"]
