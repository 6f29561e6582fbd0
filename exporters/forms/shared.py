"""shared: ``shared/<label>.<task>.onnx`` (+ ``.data``) whose weights point into
``shared/base.data`` (the base, once; a jointly trained base adds ``shared/bases/<sha>.data``)
or into the task's own data file; sessions share the base in memory (``add_initializer``)."""
from __future__ import annotations

from exporters.forms.base import BuildContext, Form, shared_spec


class Shared(Form):
    name = "shared"
    note = "per-task graphs; base weights in one shared file, shared in memory"

    def build(self, ctx: BuildContext, label: str, bundle) -> dict:
        ctx.bundle_base(bundle)
        return shared_spec(ctx, label, ctx.merged_graphs(label, bundle.tasks))
