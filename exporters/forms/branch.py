"""branch, branch_switch: low-rank (FTN) deltas as side branches ``base(x) + up(down(x))`` on
the untouched base layers (``LowRankBranch``), so only the factors are the task's own;
depthwise layers and attention row blocks have no cheaper branch and are merged. Packaged as
the shared form (``<label>.branch.<task>.onnx``) and as the switch form. Only for bundles
with such deltas."""
from __future__ import annotations

from pathlib import Path

import onnx

from pipeline.core.io import temp_dir
from exporters.forms.base import BuildContext, Form, shared_spec
from exporters.forms.switch import Switch, switch_spec
from exporters.onnx import parity
from exporters.runtime import session


def has_branches(bundle) -> bool:
    """Does any task's delta run as a side branch (so a branch form differs from merged)?"""
    return any(entry.branch(bundle.base.get_submodule(path)) is not None
               for task in bundle.tasks for path, entry in bundle.delta(task).entries.items())


def branch_graphs(ctx: BuildContext, label: str, bundle) -> dict[str, onnx.ModelProto]:
    """Each task exported with its low-rank deltas as side branches, checked against torch."""
    if (label, "branch") not in ctx.graphs:
        graphs, checks = {}, {}
        with temp_dir(ctx.exports / label) as d:
            for t in bundle.tasks:
                model = bundle.merged(t, branches=True)
                path = ctx.exporter.export(model, Path(d) / f"{t}.onnx")
                checks[f"{label}/{t}/branch_torch"] = parity(model, session(path, ctx.loader.threads),
                                                             ctx.images[t].exact_batches())
                graphs[t] = onnx.load(str(path))
        ctx.graphs[label, "branch"] = graphs
        ctx.checks.update(checks)
    return ctx.graphs[label, "branch"]


class Branch(Form):
    name = "branch"
    note = "shared form with low-rank deltas as side branches on the base layers"

    def applies(self, bundle) -> str | None:
        return None if has_branches(bundle) else "no delta of this bundle runs as a low-rank side branch"

    def build(self, ctx: BuildContext, label: str, bundle) -> dict:
        ctx.bundle_base(bundle)
        return shared_spec(ctx, f"{label}.branch", branch_graphs(ctx, label, bundle))


class BranchSwitch(Switch):
    name = "branch_switch"
    note = "switch form of the branch graphs"
    requires = ("branch",)
    reference = "branch"

    def applies(self, bundle) -> str | None:
        return Branch().applies(bundle)

    def build(self, ctx: BuildContext, label: str, bundle) -> dict:
        return switch_spec(ctx, f"{label}.branch", branch_graphs(ctx, label, bundle), ctx.bundle_base(bundle))
