"""bound: the live form's files run another way. One session on the live graph with the
switched tensors as graph inputs; every task's tensors are read once and bound to the session
per task (``BoundSession``), so a switch copies nothing and makes no session: the first answer
of a task costs what any answer does. The price is memory: the process holds every task's
tensors, where ``live`` holds one task's and reads the next from its file."""
from __future__ import annotations

from exporters.forms.base import BuildContext
from exporters.forms.live import Live
from exporters.live_session import BoundSession


class Bound(Live):
    name = "bound"
    note = "the live files; every task's tensors held and bound per task, a switch copies nothing"
    Options = None
    requires = ("live",)
    session = BoundSession

    def build(self, ctx: BuildContext, label: str, bundle) -> dict:
        live = ctx.specs[label]["live"]  # the same files: no bytes of its own
        return {**{k: v for k, v in live.items() if k != "bytes"}, "kind": "bound"}
