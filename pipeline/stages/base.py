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

    def fresh(self, ctx: StageContext, record: dict) -> str | None:
        """None if the stage's outputs are still what it wrote; else what changed. Default: every
        output exists with the size and modification time recorded."""
        for rel in record.get("outputs", []):
            p = ctx.run.root / rel
            if not p.exists():
                return f"{rel} is missing"
            if (want := record.get("fingerprints", {}).get(rel)) is not None and fingerprint(p) != want:
                return f"{rel} changed since it was written"
        return None


def fingerprint(path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


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
        elif rec and rec.get("hash") == h and (changed := stage.fresh(ctx, rec)) is None:
            ctx.log(f"{stage.name}: up to date, skipped")
            out = rec
        else:
            if rec and rec.get("hash") == h:
                ctx.log(f"{stage.name}: {changed}; running it again")
            out = {"hash": h, "outputs": [], **stage.run(ctx)}
            out["fingerprints"] = {rel: fingerprint(ctx.run.root / rel) for rel in out["outputs"]
                                   if (ctx.run.root / rel).is_file()}
            ctx.run.write_record(stage.name, out)
    ctx.timings[stage.name] = round(time.perf_counter() - t0, 2)
    return out
