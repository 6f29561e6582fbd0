"""What every stage of one run shares: the config, the run directory, the log, the hashes of
the stages before it, and what is expensive to build twice (the backbone, the task data, a
joint entry's shared weights)."""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import contextlib
import os
from contextlib import contextmanager

import torch
from safetensors.torch import load_file

from pipeline.config import MethodEntry, RunConfig
from pipeline.core.backbones import Backbone, build_backbone
from pipeline.core.io import read_json
from pipeline.data import Pools, Preprocess, TaskData, TaskIndex, task_data
from pipeline.data.tasks import open_task_source
from pipeline.methods import REGISTRY
from pipeline.stages import jobs
from pipeline.stages.jobs import Selection
from pipeline.stages.rundir import RunDir
from pipeline.training.runtime import Runtime, init_distributed, resolve_device, world_from_env


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
        self._pools: dict[str, Pools] = {}  # source (as JSON) -> its pools
        self._joint_bases: dict[str, Backbone] = {}
        self._runtime: Runtime | None = None
        self.selection = Selection()  # the units this job trains (--shard, --units)
        self.pending: list[str] = []  # units the train stage left to other jobs
        self.job = (0, 1)  # (this process, processes) of a run.jobs train stage; 0 is the main one

    @contextmanager
    def claim(self, unit):
        """This job's hold on a unit's lock (rank 0 claims; every rank of a torchrun follows)."""
        rt = self.runtime
        if not rt.distributed:
            with jobs.claim(unit, self.log) as mine:
                yield mine
            return
        import torch.distributed as dist

        with contextlib.ExitStack() as stack:
            decision = [stack.enter_context(jobs.claim(unit, self.log)) if rt.main else None]
            dist.broadcast_object_list(decision, src=0)
            yield bool(decision[0])

    def lock_holder(self, unit) -> str:
        return jobs.describe(unit / ".lock")

    @property
    def runtime(self) -> Runtime:
        """This process's device, precision and place in a torchrun (the group joined on first use)."""
        if self._runtime is None:
            r = self.cfg.run
            rank, world, local = world_from_env()
            device = resolve_device(r.device, local)
            from pipeline.training.runtime import DeviceError

            if self.cfg.train.sync_bn and world > 1 and device.type != "cuda":
                raise DeviceError("train.sync_bn: SyncBatchNorm needs CUDA devices; this run is on the CPU")
            if r.jobs > 1 and world > 1:
                raise DeviceError(f"run.jobs: {r.jobs} training processes under a torchrun of {world} ranks; every rank "
                                  "trains every unit together, so set run.jobs: 1 (or run without torchrun)")
            init_distributed(device, world)
            self._runtime = Runtime(device, r.precision, rank, world, 0, self.cfg.data.on_bad_image,
                                    self.cfg.train.sync_bn)
        return self._runtime

    @property
    def preprocess(self) -> Preprocess:
        bb = self.backbone
        return Preprocess(self.cfg.backbone.image_size, bb.mean, bb.std, bb.interpolation, bb.crop_pct)

    def pools(self, task: str) -> Pools:
        """The task's source, opened (cached: sources shared by several tasks are read once)."""
        t = next(t for t in self.cfg.tasks if t.name == task)
        key = t.source.model_dump_json()
        if key not in self._pools:
            self._pools[key] = open_task_source(t, self.cfg.run.seed)
        return self._pools[key]

    def workers(self, pools: Pools) -> int:
        """DataLoader workers for a task: none for in-memory sources, else ``run.workers``."""
        w = self.cfg.run.workers
        if w != "auto":
            return w
        return 0 if pools.in_memory else max(1, min(8, (os.cpu_count() or 2) - 1))

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            b = self.cfg.backbone
            self._backbone = build_backbone(b.name, b.weights, b.kwargs, seed=self.cfg.run.seed, weights_map=b.weights_map)
        return self._backbone

    def index(self, task: str) -> TaskIndex:
        path = self.run.prepared(task)
        return TaskIndex.from_json(read_json(path), str(path))

    def data(self, task: str) -> TaskData:
        """The task's splits over the index the prepare stage recorded."""
        if task not in self._data:
            cfg = next(t for t in self.cfg.tasks if t.name == task)
            pools = self.pools(task)
            rt = self.runtime
            self._data[task] = task_data(cfg, self.index(task), pools, self.preprocess, self.cfg.run.seed,
                                         self.cfg.train.augment, self.workers(pools), rt.device.type == "cuda",
                                         self.cfg.data.on_bad_image)
        return self._data[task]

    def images(self, task: str, split: str = "test", limit: int | None = None) -> torch.Tensor:
        """A split's first ``limit`` inputs (normalised for the backbone) as one tensor."""
        return getattr(self.data(task), "train_eval" if split == "train" else split).inputs(limit)

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
