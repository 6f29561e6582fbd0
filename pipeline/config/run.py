"""The whole run config: its sections, the method entries, and the checks across them."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.config.sections import (BackboneConfig, BenchConfig, ChecksConfig, ExportConfig, RunOptions, Strict,
                                      TrainConfig)
from pipeline.data.config import DataOptions, TaskConfig, safe_name
from pipeline.methods.base import GroupOptions, known_groups


class MethodEntry(Strict):
    """One method to run. ``label`` tells apart two runs of one method (a lambda sweep)."""

    name: str
    label: str  # a folder name: train/<label>/, bundles/<label>/
    params: BaseModel
    epochs: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    # per parameter group (head, norms, body, factors, gates, policy): optimiser, lr or lr_scale,
    # momentum, weight_decay, warmup_epochs, clip; laid over the method's own defaults
    optim: dict[str, GroupOptions] = Field(default_factory=dict)
    # label of an earlier joint entry: start from its jointly trained shared weights instead of
    # the pretrained backbone (the TAPS paper's memory-efficient joint variant)
    base: str | None = None

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    @field_validator("label")
    @classmethod
    def _safe(cls, label: str) -> str:
        return safe_name(label, "method label")

    @field_validator("optim")
    @classmethod
    def _groups(cls, optim: dict) -> dict:
        return known_groups(optim)


class RunConfig(Strict):
    run: RunOptions = Field(default_factory=RunOptions)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    tasks: list[TaskConfig]
    data: DataOptions = Field(default_factory=DataOptions)
    methods: list[MethodEntry]
    train: TrainConfig = Field(default_factory=TrainConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    checks: ChecksConfig = Field(default_factory=ChecksConfig)

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: list[TaskConfig]) -> list[TaskConfig]:
        names = [t.name for t in tasks]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"task names must be unique, repeated: {sorted(dup)}")
        if not tasks:
            raise ValueError("at least one task is needed")
        return tasks

    @model_validator(mode="after")
    def _export_needs_onnx(self) -> "RunConfig":
        if not self.export.onnx and "forms" in self.export.model_fields_set and self.export.forms:
            raise ValueError("export.forms: deployment forms are built from the ONNX exports; set export.onnx: true "
                             "or export.forms: []")
        return self

    @model_validator(mode="after")
    def _joint_references(self) -> "RunConfig":
        from pipeline.methods import REGISTRY

        tasks = {t.name for t in self.tasks}
        seen: dict[str, str] = {}
        for i, m in enumerate(self.methods):
            if m.base is not None:
                if m.base not in seen:
                    raise ValueError(f"methods[{i}].base: {m.base!r} is not the label of an earlier method entry")
                if REGISTRY[seen[m.base]].trainer != "joint":
                    joint = sorted(k for k, v in REGISTRY.items() if v.trainer == "joint")
                    raise ValueError(f"methods[{i}].base: {m.base!r} is a {seen[m.base]!r} entry; a base must come "
                                     f"from a joint method ({joint})")
            unknown = set(getattr(m.params, "task_weights", {})) - tasks
            if unknown:
                raise ValueError(f"methods[{i}].task_weights: unknown tasks {sorted(unknown)}; tasks: {sorted(tasks)}")
            seen[m.label] = m.name
        return self

    def to_jsonable(self) -> dict[str, Any]:
        """The resolved config as plain JSON (method params included), written next to outputs."""
        out = self.model_dump(mode="json", exclude={"methods"})
        out["methods"] = [
            {"name": m.name, "label": m.label, "epochs": m.epochs, "lr": m.lr, **({"base": m.base} if m.base else {}),
             **({"optim": {g: o.model_dump(mode="json", exclude_unset=True) for g, o in m.optim.items()}}
                if m.optim else {}),
             **m.params.model_dump(mode="json")}
            for m in self.methods
        ]
        return out

    def section_hash(self, *parts: Any) -> str:
        """A stable hash of JSON-able parts (and the taskfold version): does a stage rerun?"""
        from pipeline import __version__

        blob = json.dumps([__version__, parts], sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def method(self, label: str) -> MethodEntry:
        return next(m for m in self.methods if m.label == label)


