"""rows: per-task graphs like the shared form's, but a tensor whose rows (output channels)
repeat those of the base or of an earlier task stores only its new rows and an index
(``shared/<label>.rows.data``, each row once for the method); the graph assembles the tensor
with ``Gather(Concat(sources), index)``, which onnxruntime folds into a constant when the
session starts. Files as small as the bundle's own rows and pointers; latency of the merged
model; a slower bring-up (the assembly). Sessions read the base tensors from the file instead of
sharing them in memory: after the fold nothing reads them. See ``exporters.rowshare``."""
from __future__ import annotations

from exporters.datafiles import SHARED, initializer_arrays, tensor_key
from exporters.forms.base import BuildContext, Form, copy_graph, sessions_spec
from exporters.rowshare import assemble_in_graph, plan_rows


# below this share of the tasks' own bytes saved, the shared form is as good and loads faster
MIN_SAVING = 0.05


class Rows(Form):
    name = "rows"
    note = "per-task graphs storing only the rows no earlier task or the base holds; assembled at load"

    def build(self, ctx: BuildContext, label: str, bundle) -> dict:
        base_graph = ctx.bundle_base(bundle)
        graphs = ctx.merged_graphs(label, list(bundle.tasks))
        base = initializer_arrays(base_graph)
        tensors = {t: initializer_arrays(g) for t, g in graphs.items()}
        plan = plan_rows(base, tensors, ctx.writer.inline_bytes)
        if not plan.assembled():
            return {"kind": "sessions", "unavailable": "no tensor repeats rows of the base or of another task; "
                                                       "the shared form stores the same"}
        saved = plan.saved_bytes(tensors)
        # what the shared form stores: each task's tensors that no base file holds (the writer's
        # registered bases), and the base file if any whole task tensor is in one
        stored = [a for per_task in tensors.values() for a in per_task.values() if ctx.writer.stored_outside(a)]
        in_base = [tensor_key(a) in ctx.writer.bases for a in stored]
        own = sum(a.nbytes for a, shared in zip(stored, in_base) if not shared)
        extra = ctx.writer.base_bytes if plan.uses_base() and not any(in_base) else 0
        if saved - extra < MIN_SAVING * own:
            return {"kind": "sessions", "unavailable": f"repeated rows would save {saved:,} of the {own:,} bytes the "
                    "shared form stores for the tasks" + (f" but need the {extra:,}-byte base file" if extra else "")
                    + f": under {MIN_SAVING:.0%} net"}
        pool = ctx.writer.write_pool(f"{label}.rows.data", list(plan.rows.values()))
        files, detail = {}, {}
        for t, g in graphs.items():
            model = assemble_in_graph(copy_graph(g), t, plan, base)
            detail[t] = ctx.writer.write_graph(f"{label}.rows.{t}", model, pool) | {"assembled": len(plan.tasks[t])}
            files[t] = f"{SHARED}/{label}.rows.{t}.onnx"
        listed = sorted({f"{SHARED}/{f}" for i in detail.values() for f in i["files"]})
        return {**sessions_spec(files, False, listed), "detail": detail, "stored_row_bytes": plan.stored_bytes(),
                "saved_bytes": saved}
