"""merged: one self-contained plain model file per task, ``<label>/<task>.onnx`` (written by
the export stage itself; every other form is checked against it)."""
from __future__ import annotations

from exporters.forms.base import BuildContext, Form, sessions_spec


class Merged(Form):
    name = "merged"
    note = "one plain model file per task"

    def build(self, ctx: BuildContext, label: str, bundle) -> dict:
        return sessions_spec({t: f"{label}/{t}.onnx" for t in bundle.tasks}, shared=False)

    def check(self, ctx: BuildContext, label: str, spec: dict) -> dict[str, dict]:
        return {}  # the reference itself; the export stage checks it against torch
