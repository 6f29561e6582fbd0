"""Method registry: one module per method, same contract (see ``base.Method``)."""
from __future__ import annotations

from pipeline.methods.base import Method

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    REGISTRY[cls.name] = cls
    return cls


def build_method(name: str, config=None) -> Method:
    if name not in REGISTRY:
        raise KeyError(f"unknown method {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name](config)


from pipeline.methods import adashare, baselines, cwps, ftn, joint_taps, taps  # noqa: E402,F401  (registration)
