"""The ``tasks`` and ``data`` sections of a run config: where each task's images come from, how
many, and what to do with an image that cannot be decoded."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# a name that becomes a path part: letters, digits, '_', '-', '.', not starting with '.'
SAFE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$"


def safe_name(value: str, what: str) -> str:
    """``value`` if it can be a folder or file name inside a run directory (no separators, no
    ``.``/``..``, no leading dot), else a ValueError that says why."""
    import re

    if not isinstance(value, str) or not re.fullmatch(SAFE_NAME, value):
        raise ValueError(f"{value!r} cannot be a {what}: it names a folder in the run directory, so it must be 1-100 "
                         "letters, digits, '_', '-' or '.', not starting with '.' (no '/', no '..')")
    return value


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["fashion_mnist", "digits", "image_folder", "file_list", "torchvision"]
    # fashion_mnist: the IDX folder (default: the Debian package's); image_folder: the folder;
    # file_list: the CSV or JSON-lines file; torchvision: the dataset's local root
    root: str | None = None
    dataset: str | None = None  # torchvision class name, e.g. "CIFAR10"

    @model_validator(mode="after")
    def _needs(self, info: ValidationInfo) -> "SourceConfig":
        if self.type in ("image_folder", "file_list", "torchvision") and not self.root:
            raise ValueError(f"source type {self.type!r} needs 'root'")
        if self.type == "torchvision" and not self.dataset:
            raise ValueError("source type 'torchvision' needs 'dataset' (e.g. CIFAR10)")
        check = (info.context or {}).get("check_paths", True)
        if check and self.root is not None and not Path(self.root).exists():
            raise ValueError(f"root: path does not exist: {self.root}")
        return self


class TaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    source: SourceConfig
    domain: Literal["none", "sketch", "negative", "texture", "lowres"] = "none"
    train_size: int | None = Field(None, ge=1)
    val_size: int = Field(200, ge=1)
    test_size: int | None = Field(None, ge=1)
    # share of the resized image the centre crop keeps; None: the source's own choice (full-frame
    # glyph sets keep everything) or else the backbone's pretrained config (e.g. 0.875)
    crop_pct: float | None = Field(None, gt=0, le=1)

    @field_validator("name")
    @classmethod
    def _safe(cls, name: str) -> str:
        return safe_name(name, "task name")


class DataOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    on_bad_image: Literal["error", "skip"] = Field(
        "error", description="an image that cannot be decoded stops the run (naming it), or is skipped and reported")
