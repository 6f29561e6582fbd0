"""The pool scheduler's bookkeeping for methods that borrow from earlier units (CWPS).

A pool entry trains its tasks in order, ``passes`` times. Every unit's delta is a *version*
(``<task>@<pass>``); a unit may borrow from the version each task keeps so far, which is the
one with the best validation accuracy (ties keep the earlier). The train stage feeds finished
units in order with ``add``; ``pool()`` is what the next unit may borrow from, ``kept`` what
the bundle stores.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.delta import TaskDelta
from pipeline.core.versions import version_id


@dataclass
class PoolLedger:
    versions: dict[str, TaskDelta] = field(default_factory=dict)  # every version so far, linked
    kept: dict[str, tuple[str, float]] = field(default_factory=dict)  # task -> (version, val acc)
    history: dict[str, list[dict]] = field(default_factory=dict)  # task -> every pass's figures

    def pool(self) -> list[str]:
        return [vid for vid, _ in self.kept.values()]

    def add(self, task: str, pass_: int, delta: TaskDelta, result: dict) -> str:
        """Record a finished unit; returns its version id."""
        vid = version_id(task, pass_)
        self.versions[vid] = delta.link(self.versions)
        self.history.setdefault(task, []).append({"pass": pass_, "version": vid, **{
            k: result[k] for k in ("val_acc", "test_acc", "train_seconds")}, "params": delta.params()})
        if task not in self.kept or result["val_acc"] > self.kept[task][1]:
            self.kept[task] = (vid, result["val_acc"])
        return vid

    def final(self) -> dict[str, str]:
        """task -> the version it keeps."""
        return {task: vid for task, (vid, _) in self.kept.items()}
