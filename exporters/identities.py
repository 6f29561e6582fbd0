"""A traced graph with some of its modules turned into identities (AdaShare's skipped blocks):
each such module's nodes are removed and what read its output reads its input. This lets one
trace of the full architecture serve every task that skips blocks of it, instead of one trace
(several seconds each) per skip pattern.

Nodes are attributed to modules by the scopes the dynamo exporter records on each node
(``pkg.torch.onnx.name_scopes``, the module paths the node was made in), so this runs on the
exporter's graph before ``strip_debug``. A module is removable when its nodes read exactly one
value from outside (its input, besides weights) and exactly one of their values is read
outside (its output), as for a residual block ``x + f(x)``; otherwise ``NotRemovable`` says
why and the caller traces the model instead.
"""
from __future__ import annotations

import ast

import onnx

SCOPES = "pkg.torch.onnx.name_scopes"


class NotRemovable(ValueError):
    """A module's nodes are not a one-input, one-output piece of the graph (or have no scopes)."""


def _scopes(node: onnx.NodeProto) -> list[str]:
    for p in node.metadata_props:
        if p.key == SCOPES:
            return ast.literal_eval(p.value)
    return []


def _constant_values(g: onnx.GraphProto) -> set[str]:
    """Initializers, and every value computed from them alone (nodes are in topological order)."""
    fixed = {i.name for i in g.initializer}
    for n in g.node:
        if all(i in fixed for i in n.input if i):
            fixed.update(n.output)
    return fixed


def without_modules(model: onnx.ModelProto, paths: list[str]) -> onnx.ModelProto:
    """``model`` (changed in place and returned) with the modules at ``paths`` as identities."""
    g = model.graph
    fixed = _constant_values(g)  # the exporter shares constants between modules: those are not inputs
    scopes = {tuple(n.output): _scopes(n) for n in g.node}  # read once: outputs name a node for good
    graph_outputs = {o.name for o in g.output}
    for path in paths:
        inside = [n for n in g.node if path in scopes[tuple(n.output)]]
        if not inside:
            raise NotRemovable(f"no node of the graph was made in module {path!r}")
        made = {o for n in inside for o in n.output}
        read = {i for n in inside for i in n.input if i and i not in made and i not in fixed}
        outside = [n for n in g.node if path not in scopes[tuple(n.output)]]
        used = made & ({i for n in outside for i in n.input} | graph_outputs)
        if len(read) != 1 or len(used) != 1:
            raise NotRemovable(f"module {path!r} reads {sorted(read)} and gives {sorted(used)}: not one value "
                               "in and one out")
        (x,), (y,) = read, used
        if y in graph_outputs:
            raise NotRemovable(f"module {path!r} gives the graph's output")
        for n in outside:
            for k, name in enumerate(n.input):
                if name == y:
                    n.input[k] = x
        del g.node[:]
        g.node.extend(outside)
        stale = [v for v in g.value_info if v.name in made]
        for v in stale:
            g.value_info.remove(v)
    return model
