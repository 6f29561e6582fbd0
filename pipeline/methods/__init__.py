"""The methods, by the name a config uses. One line per method: a new method is its own
module(s) plus a line here (see ``base`` for the contracts)."""
from __future__ import annotations

from pipeline.methods.adashare import AdaShare
from pipeline.methods.base import IncrementalMethod, JointMethod, Method, PoolMethod
from pipeline.methods.baselines import FineTune, JointFineTune, LinearProbe, NormHead
from pipeline.methods.cwps import Cwps
from pipeline.methods.ftn import Ftn
from pipeline.methods.lora import Lora
from pipeline.methods.taps import JointTaps, Taps

REGISTRY: dict[str, type[Method]] = {method.name: method for method in (
    FineTune,
    LinearProbe,
    NormHead,
    Taps,
    Ftn,
    Cwps,
    Lora,
    JointFineTune,
    JointTaps,
    AdaShare,
)}


def build_method(name: str, config=None) -> Method:
    if name not in REGISTRY:
        raise KeyError(f"unknown method {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name](config)


__all__ = ["REGISTRY", "build_method", "Method", "IncrementalMethod", "PoolMethod", "JointMethod"]
