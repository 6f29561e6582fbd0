"""The bundle manifest's schema. A bundle is untrusted input: the manifest is validated before
anything it says is used, and nothing in it can make taskfold open a path outside the bundle
(file entries are fixed relative names, checked against the task names) or pass a file path to a
model constructor (backbone kwargs are plain values, never weight or config locations).
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FORMAT = "taskfold-bundle/1"
BASE_FILE = "base.safetensors"
SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
# backbone constructor options that load or name files or download locations: a bundle may not
# set them (timm's and torchvision's)
UNSAFE_KWARGS = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "weights",
                 "weights_backbone", "progress", "features_only"}


def task_file(task: str) -> str:
    return f"tasks/{task}.safetensors"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileRecord(Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class TaskRecord(Strict):
    file: str
    num_classes: int = Field(ge=1)
    classes: list[str] | None = None
    crop_pct: float | None = Field(None, gt=0, le=1)  # the task's evaluation crop, where its source sets one


def _plain(value: Any) -> bool:
    if isinstance(value, str):
        return not any(s in value for s in ("/", "\\", "://"))  # nothing that looks like a location
    if isinstance(value, (bool, int, float)) or value is None:
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return False


class BackboneRecord(Strict):
    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str = ""
    image_size: int = Field(ge=8)
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)
    num_features: int = Field(ge=1)
    interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"] = "bilinear"
    crop_pct: float = Field(0.875, gt=0, le=1)

    @field_validator("kwargs")
    @classmethod
    def _safe_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        for k, v in kwargs.items():
            if k in UNSAFE_KWARGS:
                raise ValueError(f"kwargs.{k}: a bundle may not set constructor options that load files or weights")
            if not _plain(v):
                raise ValueError(f"kwargs.{k}: only plain values (numbers, names, lists of them), no paths")
        return kwargs


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")  # newer writers may add facts; what is read is checked

    format: Literal["taskfold-bundle/1"]
    method: dict[str, Any]
    backbone: BackboneRecord
    versions: dict[str, str] = Field(default_factory=dict)
    files: dict[str, FileRecord]
    tasks: dict[str, TaskRecord] = Field(min_length=1)
    ledger: dict[str, Any]

    @field_validator("method")
    @classmethod
    def _method(cls, m: dict) -> dict:
        if not isinstance(m.get("name"), str):
            raise ValueError("method.name: missing")
        return m

    @model_validator(mode="after")
    def _files(self) -> "Manifest":
        for task, rec in self.tasks.items():
            if not SAFE.match(task):
                raise ValueError(f"tasks: {task!r} is not a task name (letters, digits, _ - ., no path)")
            if rec.file != task_file(task):
                raise ValueError(f"tasks.{task}.file: {rec.file!r}; a task's file is {task_file(task)!r} in its bundle")
        expected = {BASE_FILE} | {task_file(t) for t in self.tasks}
        if set(self.files) != expected:
            extra, missing = sorted(set(self.files) - expected), sorted(expected - set(self.files))
            raise ValueError(f"files: lists {extra} beyond the base and the tasks' files" if extra else
                             f"files: does not list {missing}")
        return self
