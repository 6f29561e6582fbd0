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
from pipeline.core.io import write_json
from pipeline.stages.base import Stage, run_stage
from pipeline.stages.bench import BenchStage
from pipeline.stages.context import StageContext
from pipeline.stages.export import ExportStage
from pipeline.stages.fold import FoldStage
from pipeline.stages.prepare import PrepareStage
from pipeline.stages.report import ReportStage
from pipeline.stages.rundir import RunDir
from pipeline.stages.train import TrainStage

PIPELINE: tuple[Stage, ...] = (PrepareStage(), TrainStage(), FoldStage(), ExportStage(), BenchStage(), ReportStage())
STAGES = tuple(s.name for s in PIPELINE)


class Runner:
    def __init__(self, cfg: RunConfig, out: Path, progress: bool = True, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.run_dir = RunDir(out)
        self.ctx = StageContext(cfg, self.run_dir, progress, log)

    def run(self, until: str = "report", force: tuple[str, ...] = ()) -> dict:
        if until not in STAGES:
            raise ValueError(f"--until: unknown stage {until!r}; stages: {', '.join(STAGES)}")
        if STAGES.index(until) >= STAGES.index("export") and self.cfg.export.onnx:
            from exporters.runtime import onnxruntime

            onnxruntime()  # fail now, not after training, when no runtime is installed
        torch.set_num_threads(self.cfg.run.threads)
        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir.config_file, self.cfg.to_jsonable())
        for name in force:  # a forced stage's outputs change what every later stage read
            for later in STAGES[STAGES.index(name):]:
                self.run_dir.stage_file(later).unlink(missing_ok=True)
        results = {}
        for stage in PIPELINE:
            results[stage.name] = run_stage(stage, self.ctx)
            if stage.name == until:
                break
        return results
