"""The delta kinds, by the name their files store. One line per kind: a new kind is its own
module plus a line here, and fold, bundle, ledger and the exporters need no change."""
from __future__ import annotations

from pipeline.core.delta.base import Delta
from pipeline.core.delta.channel_select import ChannelSelect
from pipeline.core.delta.head import Head
from pipeline.core.delta.lowrank import LowRank
from pipeline.core.delta.overlay import Norm, Replace
from pipeline.core.delta.skip import Skip

KINDS: dict[str, type[Delta]] = {kind.kind: kind for kind in (
    Replace,
    Norm,
    Head,
    LowRank,
    Skip,
    ChannelSelect,
)}
