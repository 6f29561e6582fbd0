"""TaskDelta: everything task-specific about one task, as module path -> delta kind.

The one vocabulary that methods emit and fold, bundle and exporters read. The file form is
``pipeline.core.delta.codec``; the kinds are registered in ``pipeline.core.delta.registry``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from pipeline.core.delta.base import Delta


@dataclass
class TaskDelta:
    """Everything task-specific about one task, in the shared vocabulary.

    ``gate_bits`` counts binary per-layer decisions that are stored as the *presence* of
    an entry (TAPS: one gate per candidate layer); they cost bits but no tensor.
    """

    task: str
    method: str
    entries: dict[str, Delta] = field(default_factory=dict)
    gate_bits: int = 0
    classes: list[str] = field(default_factory=list)  # the task's class names, in label order (may be empty)

    def by_kind(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for d in self.entries.values():
            row = out.setdefault(d.kind, {"entries": 0, "params": 0, "bits": 0})
            row["entries"] += 1
            row["params"] += d.params()
            row["bits"] += d.bits()
        if self.gate_bits:
            out["gate"] = {"entries": self.gate_bits, "params": 0, "bits": self.gate_bits}
        return out

    def params(self) -> int:
        return sum(d.params() for d in self.entries.values())

    def bits(self) -> int:
        return sum(d.bits() for d in self.entries.values()) + self.gate_bits

    def references(self) -> set[str]:
        """Other deltas this one reads rows from (empty for every kind but channel-select)."""
        return set().union(*(d.references() for d in self.entries.values()))

    def link(self, others: Mapping[str, "TaskDelta"]) -> "TaskDelta":
        """Link every entry to the same-path entries of the deltas it references; returns self."""
        for path, entry in self.entries.items():
            if refs := entry.references():
                missing = refs - set(others)
                if missing:
                    raise KeyError(f"task {self.task!r}, entry {path!r}: points to {sorted(missing)}, not available")
                entry.link({name: others[name].entries.get(path) for name in refs})
        return self

    def to(self, device) -> "TaskDelta":
        """A copy with every tensor on ``device`` (links to other deltas are not copied: relink)."""
        entries = {path: type(d).from_tensors({k: v.detach().to(device) for k, v in d.tensors().items()}, d.attrs())
                   for path, d in self.entries.items()}
        return TaskDelta(self.task, self.method, entries, self.gate_bits, list(self.classes))

    def flat_tensors(self) -> dict[str, torch.Tensor]:
        """``{path}::{kind}::{name}`` -> contiguous tensor, the safetensors payload."""
        return {
            f"{path}::{d.kind}::{name}": t.detach().contiguous().cpu()
            for path, d in self.entries.items()
            for name, t in d.tensors().items()
        }
