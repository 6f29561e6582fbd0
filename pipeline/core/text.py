"""Small text helpers shared by every report section and terminal table."""
from __future__ import annotations

from typing import Any, Sequence


def fmt(x: Any, spec: str, none: str = "-") -> str:
    """``format(x, spec)``, or ``none`` for a missing value."""
    return none if x is None else format(x, spec)


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table as lines."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
