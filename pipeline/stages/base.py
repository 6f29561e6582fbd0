"""A stage is a small object: the hash of its inputs, and what it does. The runner skips a stage
whose record (``stages/<name>.json``) holds the same hash and whose outputs all exist, and
reruns a forced stage and every stage after it (they read its outputs)."""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any, ClassVar

from pipeline.stages.context import StageContext


def digest(*parts: Any) -> str:
    """A stable hash of JSON-able parts and the taskfold version: does a stage rerun?"""
    from pipeline import __version__

    blob = json.dumps([__version__, parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class Stage:
    name: ClassVar[str]

    def inputs(self, ctx: StageContext) -> str | None:
        """The hash of everything the stage reads; None: the stage always runs (and keeps no record)."""
        return None

    def disabled(self, ctx: StageContext) -> str | None:
        """Why the config turns the stage off, or None."""
        return None

    def run(self, ctx: StageContext) -> dict:
        """Do the work; return the record (``outputs``: run-relative paths it wrote, and figures)."""
        raise NotImplementedError


def run_stage(stage: Stage, ctx: StageContext) -> dict:
    h = stage.inputs(ctx)
    t0 = time.perf_counter()
    if h is None:
        out = stage.run(ctx)
    else:
        ctx.hashes[stage.name] = h
        rec = ctx.run.record(stage.name)
        if reason := stage.disabled(ctx):
            ctx.log(f"{stage.name}: {reason}")
            out = {"hash": h, "outputs": []}
            ctx.run.write_record(stage.name, out)
        elif rec and rec.get("hash") == h and all((ctx.run.root / o).exists() for o in rec.get("outputs", [])):
            ctx.log(f"{stage.name}: up to date, skipped")
            out = rec
        else:
            out = {"hash": h, "outputs": [], **stage.run(ctx)}
            ctx.run.write_record(stage.name, out)
    ctx.timings[stage.name] = round(time.perf_counter() - t0, 2)
    return out
