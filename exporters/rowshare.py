"""Row sharing between task graphs: a task tensor whose rows (output channels) are mostly the
base's, or another task's, is stored as the rows no earlier graph holds plus one index per row,
and put back together in the graph by ``Gather(Concat(sources), index)``. onnxruntime folds
those two nodes into a constant when a session starts, so the session runs the plain merged
kernels; only the files are smaller.

Nothing here knows a method: rows are matched by content (a row of the base or one that an
earlier task stores), so whatever trained the tasks (CWPS's channel pointers, a layer frozen
per channel) only shows up as rows that repeat.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

BASE = "base"


@dataclass
class Assembly:
    """One task tensor put together from row sources: ``sources`` names the tensors (``base``,
    or the task whose stored rows are meant), ``index[c]`` is row c's row in their concatenation."""

    sources: list[str]
    index: np.ndarray


@dataclass
class RowPlan:
    """Per task, which tensors are assembled and from what; ``rows[(tensor, task)]``: the rows
    that task stores for that tensor (its new rows only, in channel order)."""

    tasks: dict[str, dict[str, Assembly]] = field(default_factory=dict)
    rows: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)

    def stored_bytes(self) -> int:
        return sum(r.nbytes for r in self.rows.values())

    def assembled(self) -> int:
        return sum(len(a) for a in self.tasks.values())

    def uses_base(self) -> bool:
        return any(BASE in a.sources for per_task in self.tasks.values() for a in per_task.values())

    def saved_bytes(self, tasks: dict[str, dict[str, np.ndarray]]) -> int:
        """Bytes not stored, against storing every assembled tensor whole."""
        whole = sum(tasks[t][name].nbytes for t, per_task in self.tasks.items() for name in per_task)
        return whole - self.stored_bytes()


def plan_rows(base: dict[str, np.ndarray], tasks: dict[str, dict[str, np.ndarray]], min_bytes: int) -> RowPlan:
    """``base`` and ``tasks[task]``: name -> tensor (the graphs' initializers), tasks in the
    order their rows are stored (a task borrows from the base and the tasks before it). A float
    tensor of ``min_bytes`` or more that differs from the base tensor of its name is assembled
    when some of its rows repeat; tensors with no repeated row stay whole. Only tensors of two
    or more axes: in a vector (a norm's scale) a "row" is one number, which repeats by chance and
    costs as much as its index."""
    plan = RowPlan(tasks={t: {} for t in tasks})
    for name, ref in base.items():
        if ref.dtype.kind != "f" or ref.nbytes < min_bytes or ref.ndim < 2:
            continue
        known = {ref[r].tobytes(): (BASE, r) for r in range(ref.shape[0])}  # row content -> (owner, row)
        for task, tensors in tasks.items():
            got = tensors.get(name)
            if got is None or got.shape != ref.shape or got.dtype != ref.dtype or np.array_equal(got, ref):
                continue
            found = [known.get(got[r].tobytes()) for r in range(got.shape[0])]
            new = [r for r, f in enumerate(found) if f is None]
            if len(new) == got.shape[0]:
                continue  # nothing repeats: stored whole, as the shared form stores it
            if new:
                plan.rows[name, task] = np.ascontiguousarray(got[new])
                for j, r in enumerate(new):
                    found[r] = known.setdefault(got[r].tobytes(), (task, j))
            plan.tasks[task][name] = _assembly(found, {BASE: ref.shape[0]} | {
                o: plan.rows[name, o].shape[0] for o, _ in found if o != BASE})
    return plan


def _assembly(found: list[tuple[str, int]], sizes: dict[str, int]) -> Assembly:
    """The sources a tensor reads (in first-use order, base first) and each row's index into
    their concatenation."""
    sources = [BASE] if any(o == BASE for o, _ in found) else []
    sources += sorted({o for o, _ in found if o != BASE})
    start, offset = {}, 0
    for s in sources:
        start[s], offset = offset, offset + sizes[s]
    return Assembly(sources, np.array([start[o] + r for o, r in found], dtype=np.int32))


def source_name(tensor: str, source: str) -> str:
    return f"{tensor}::{'base' if source == BASE else 'rows.' + source}"


def assemble_in_graph(model: onnx.ModelProto, task: str, plan: RowPlan, base: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``model`` with each planned tensor replaced by its sources (base tensor, stored rows) and
    a ``Gather(Concat(sources), index)`` in front of the nodes that read it."""
    assemblies = plan.tasks[task]
    kept = [i for i in model.graph.initializer if i.name not in assemblies]
    nodes, added = [], []
    for name, a in assemblies.items():
        inputs = []
        for s in a.sources:
            arr = base[name] if s == BASE else plan.rows[name, s]
            inputs.append(source_name(name, s))
            added.append(numpy_helper.from_array(arr, inputs[-1]))
        added.append(numpy_helper.from_array(a.index, f"{name}::index"))
        table = inputs[0]
        if len(inputs) > 1:
            table = f"{name}::sources"
            nodes.append(helper.make_node("Concat", inputs, [table], axis=0, name=f"{name}::concat"))
        nodes.append(helper.make_node("Gather", [table, f"{name}::index"], [name], axis=0, name=f"{name}::gather"))
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + added)
    old = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + old)
    return model
