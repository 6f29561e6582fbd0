"""Reading a config: YAML in, validated ``RunConfig`` out, every error naming the file and field."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.config.run import RunConfig
from pipeline.core.errors import TaskfoldError


class ConfigError(TaskfoldError, ValueError):
    """A config that cannot be used; the message names the file and the field."""


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
        common = {k: entry.pop(k) for k in ("epochs", "lr", "base", "optim") if k in entry}
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
