"""switch: ``shared/<label>.switch.onnx`` + ``<label>.<task>.onnx_adapter``: one session, the
task picked per request by an onnxruntime adapter (``RunOptions.add_active_adapter``).
IOBinding ignores adapters, so this form runs through ``run()`` only."""
from __future__ import annotations

from typing import Callable

import onnx

from exporters.adapters import AdapterTarget, write_switch
from exporters.datafiles import SHARED, FormError
from exporters.forms.base import BuildContext, Form, copy_graph
from exporters.loader import Loader


def switch_spec(ctx: BuildContext, name: str, graphs: dict[str, onnx.ModelProto], base: onnx.ModelProto) -> dict:
    try:
        info = write_switch(ctx.writer, name, {t: copy_graph(g) for t, g in graphs.items()}, base)
    except FormError as err:
        ctx.log(f"  {name}: no switch form: {err}")
        return {"kind": "adapters", "unavailable": str(err)}
    files = [f"{SHARED}/{f}" for f in info["files"]]
    adapters = {t: f"{SHARED}/{a['file']}" for t, a in info["adapters"].items()}
    return {"kind": "adapters", "graph": f"{SHARED}/{name}.switch.onnx", "tasks": adapters,
            "files": sorted(set(files) | set(adapters.values())), "switched_tensors": len(info["inputs"])}


class Switch(Form):
    name = "switch"
    note = "one session; the task is an onnxruntime adapter file"
    one_session = True

    def build(self, ctx: BuildContext, label: str, bundle) -> dict:
        return switch_spec(ctx, label, ctx.merged_graphs(label, bundle.tasks), ctx.bundle_base(bundle))

    def resident(self, loader: Loader, spec: dict):
        return loader.open(spec["graph"], shared=True)

    def targets(self, loader: Loader, spec: dict) -> dict[str, Callable]:
        sess = self.resident(loader, spec)
        return {t: AdapterTarget(sess, loader.path(rel)) for t, rel in spec["tasks"].items()}

    def bring_up(self, loader: Loader, spec: dict, task: str, resident=None) -> Callable:
        return AdapterTarget(resident if resident is not None else self.resident(loader, spec),
                             loader.path(spec["tasks"][task]))
