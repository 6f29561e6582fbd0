"""The thin runner: prepare -> train -> fold -> export -> bench -> report into one run directory.

Each stage records the hash of its inputs; one whose record matches (and whose outputs exist)
is skipped. Training is resumable per unit from its last epoch checkpoint. Every output is
written under a temp name and renamed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from pipeline.config import RunConfig
from pipeline.core.io import sweep, write_json
from pipeline.stages.base import Stage, run_stage
from pipeline.stages.bench import BenchStage
from pipeline.stages.context import StageContext
from pipeline.stages.export import ExportStage
from pipeline.stages.fold import FoldStage
from pipeline.stages.jobs import Selection
from pipeline.stages.prepare import PrepareStage
from pipeline.stages.report import ReportStage
from pipeline.stages.rundir import RunDir
from pipeline.stages.train import TrainStage

PIPELINE: tuple[Stage, ...] = (PrepareStage(), TrainStage(), FoldStage(), ExportStage(), BenchStage(), ReportStage())
STAGES = tuple(s.name for s in PIPELINE)


class Runner:
    """Runs the stages in order. Under torchrun every process prepares (rank 0 writes, the others
    read) and trains each unit together; the later stages run once, in rank 0. A job given a
    ``selection`` (``--shard``, ``--units``) trains its share and stops after the train stage."""

    def __init__(self, cfg: RunConfig, out: Path, progress: bool = True, log: Callable[[str], None] = print,
                 selection: Selection | None = None):
        self.cfg = cfg
        self.run_dir = RunDir(out)
        self.ctx = StageContext(cfg, self.run_dir, progress, log)
        if selection is not None:
            self.ctx.selection = selection

    def run(self, until: str = "report", force: tuple[str, ...] = ()) -> dict:
        if until not in STAGES:
            raise ValueError(f"--until: unknown stage {until!r}; stages: {', '.join(STAGES)}")
        ctx = self.ctx
        if not ctx.selection.everything and STAGES.index(until) > STAGES.index("train"):
            ctx.log("train: this job trains a share of the units (--shard/--units), so it stops after the train "
                    "stage; a plain `taskfold run` afterwards folds, exports, benches and reports")
            until = "train"
        rt = ctx.runtime  # joins the process group of a torchrun, fails early on a device that is not here
        if STAGES.index(until) >= STAGES.index("export") and self.cfg.export.onnx and rt.main:
            from exporters.runtime import onnxruntime

            onnxruntime()  # fail now, not after training, when no runtime is installed
        torch.set_num_threads(self.cfg.run.threads)
        if rt.main:
            self.run_dir.root.mkdir(parents=True, exist_ok=True)
            if swept := sweep(self.run_dir.root):
                ctx.log(f"removed {len(swept)} temp file(s) left by a killed run: "
                        f"{', '.join(self.run_dir.rel(p) for p in swept[:3])}{', ...' if len(swept) > 3 else ''}")
            write_json(self.run_dir.config_file, self.cfg.to_jsonable())
            for name in force:  # a forced stage's outputs change what every later stage read
                for later in STAGES[STAGES.index(name):]:
                    self.run_dir.stage_file(later).unlink(missing_ok=True)
        else:
            ctx.log = lambda s: None  # one process speaks
        rt.barrier()
        results = {}
        for stage in PIPELINE:
            if stage.name == "prepare" and rt.distributed:
                if rt.main:
                    results[stage.name] = run_stage(stage, ctx)
                rt.barrier()  # the others find rank 0's record fresh and read its index
                if not rt.main:
                    results[stage.name] = run_stage(stage, ctx)
            elif stage.name == "train" or rt.main:
                results[stage.name] = run_stage(stage, ctx)
            if stage.name == "train":
                rt.barrier()
                if not rt.main:
                    break  # the later stages run once, in rank 0
                if ctx.pending:
                    ctx.log(f"train: {len(ctx.pending)} unit(s) not trained here ({', '.join(ctx.pending[:4])}"
                            f"{', ...' if len(ctx.pending) > 4 else ''}); the later stages wait until every unit "
                            "is trained: run the same command again (without --shard/--units) when the other jobs "
                            "are done")
                    break
            if stage.name == until:
                break
        return results
