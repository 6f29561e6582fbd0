"""The ``tasks`` section of a run config: where each task's images come from and how many."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["fashion_mnist", "digits", "image_folder", "torchvision"]
    root: str | None = None  # fashion_mnist defaults to the Debian package's folder
    dataset: str | None = None  # torchvision class name, e.g. "CIFAR10"

    @model_validator(mode="after")
    def _needs(self) -> "SourceConfig":
        if self.type in ("image_folder", "torchvision") and not self.root:
            raise ValueError(f"source type {self.type!r} needs 'root'")
        if self.type == "torchvision" and not self.dataset:
            raise ValueError("source type 'torchvision' needs 'dataset' (e.g. CIFAR10)")
        if self.root is not None and not Path(self.root).exists():
            raise ValueError(f"root: path does not exist: {self.root}")
        return self


class TaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    source: SourceConfig
    domain: Literal["none", "sketch", "negative", "texture", "lowres"] = "none"
    train_size: int | None = Field(None, ge=1)
    val_size: int = Field(200, ge=1)
    test_size: int | None = Field(None, ge=1)
