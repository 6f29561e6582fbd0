"""What every stage of one run shares: the config, the run directory, the log, the hashes of
the stages before it, and what is expensive to build twice (the backbone, the task data, a
joint entry's shared weights)."""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import torch
from safetensors.torch import load_file, safe_open

from pipeline.config import MethodEntry, RunConfig
from pipeline.core.backbones import Backbone, build_backbone
from pipeline.data import TaskData, normalise
from pipeline.methods import REGISTRY
from pipeline.stages.rundir import RunDir


class StageContext:
    def __init__(self, cfg: RunConfig, run: RunDir, progress: bool = True, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.run = run
        self.progress = progress
        self.log = log
        self.hashes: dict[str, str] = {}  # stage -> its input hash, once it has run or been skipped
        self.timings: dict[str, float] = {}
        self._backbone: Backbone | None = None
        self._data: dict[str, TaskData] = {}
        self._joint_bases: dict[str, Backbone] = {}

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            b = self.cfg.backbone
            self._backbone = build_backbone(b.name, b.weights, b.kwargs, seed=self.cfg.run.seed)
        return self._backbone

    def data(self, task: str) -> TaskData:
        if task not in self._data:
            path = str(self.run.prepared(task))
            with safe_open(path, framework="pt") as f:
                k = int(f.metadata()["num_classes"])
            self._data[task] = TaskData.from_tensors(task, k, load_file(path))
        return self._data[task]

    def keep_data(self, data: TaskData) -> None:
        self._data[data.name] = data

    def images(self, task: str, split: str = "test") -> torch.Tensor:
        """A split's images, normalised for the backbone."""
        s = getattr(self.data(task), split)
        return normalise(s.images, self.backbone.mean, self.backbone.std)

    def joint_base(self, label: str) -> Backbone:
        """The backbone with the shared weights a joint entry trained (its bundle's base)."""
        if label not in self._joint_bases:
            features = copy.deepcopy(self.backbone.features)
            state = load_file(str(self.run.shared_weights(label)))
            features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()})
            self._joint_bases[label] = dataclasses.replace(self.backbone, features=features)
        return self._joint_bases[label]

    def forget_joint_base(self, label: str) -> None:
        self._joint_bases.pop(label, None)

    def start_backbone(self, entry: MethodEntry) -> Backbone:
        """What an entry trains from: the pretrained backbone, or the joint entry named by ``base``."""
        return self.joint_base(entry.base) if entry.base else self.backbone

    def bundle_backbone(self, entry: MethodEntry) -> Backbone:
        """What an entry's deltas merge onto: its own shared weights for a joint entry."""
        return self.joint_base(entry.label) if REGISTRY[entry.name].trainer == "joint" else self.start_backbone(entry)
