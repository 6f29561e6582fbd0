"""bound: the live form's files run another way. One session on the live graph with the
switched tensors as graph inputs; every task's tensors are read once and bound to the session
per task (``BoundSession``), so a switch copies nothing and makes no session: the first answer
of a task costs what any answer does. The price is memory: the process holds every task's
tensors, where ``live`` holds one task's and reads the next from its file."""
from __future__ import annotations

from typing import Callable

from exporters.forms.base import BuildContext, Form
from exporters.live_session import BoundSession
from exporters.loader import Loader


class Bound(Form):
    name = "bound"
    note = "the live files; every task's tensors held and bound per task, a switch copies nothing"
    requires = ("live",)
    cpu_only = True

    def build(self, ctx: BuildContext, label: str, bundle) -> dict:
        live = ctx.specs[label]["live"]  # the same files: no bytes of its own
        return {**{k: v for k, v in live.items() if k != "bytes"}, "kind": "bound"}

    def resident(self, loader: Loader, spec: dict) -> BoundSession:
        return BoundSession(loader.path(spec["graph"]), {t: loader.path(f) for t, f in spec["tasks"].items()},
                            spec.get("built_on", {}), loader.threads, loader.providers)

    def targets(self, loader: Loader, spec: dict) -> dict[str, Callable]:
        bound = self.resident(loader, spec)
        return {t: bound.runner(t) for t in spec["tasks"]}

    def bring_up(self, loader: Loader, spec: dict, task: str, resident=None) -> Callable:
        return (resident if resident is not None else self.resident(loader, spec)).runner(task)
