"""The run directory: every path, version id and record a run writes, in one place.

::

    config.resolved.json
    prepared/<task>.json                  the task's index: items (paths or source positions), labels, classes
    train/<label>/<task>/{checkpoint.pt, delta.safetensors, result.json}
    train/<label>/<task>/pass<p>/...        pool methods that pass over the tasks more than once
    train/<label>/@joint/{shared.safetensors, result.json}  joint methods: the shared weights
    bundles/<label>/                      see pipeline.core.bundle
    exports/base.onnx, exports/<label>/<task>.onnx, exports/forms.json, exports/shared/
    stages/<stage>.json                   input hash + what the stage measured
    bench/<name>.json                     ``taskfold bench`` on another machine
    results.json, report.md, plots/*.png

The stages, the report, the CLI and the benchmarks read a run through this class, never by
building paths of their own.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import TaskfoldError
from pipeline.core.io import read_json, write_json

# a joint entry's own folder under train/<label>/; task names cannot contain "@", so no clash
JOINT_UNIT = "@joint"


class RunDirError(TaskfoldError, ValueError):
    """A path that would land outside the run directory."""


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)

    def inside(self, path: Path) -> Path:
        """``path``, after checking that it lands inside the run directory (names are validated at
        config time; this is the last guard before anything is written, removed or replaced)."""
        root, target = self.root.resolve(), Path(path).resolve()
        if target != root and root not in target.parents:
            raise RunDirError(f"{path}: outside the run directory {self.root}; refusing to write there")
        return Path(path)

    # ---------------------------------------------------------------- inputs and training

    @property
    def config_file(self) -> Path:
        return self.root / "config.resolved.json"

    def prepared(self, task: str) -> Path:
        return self.inside(self.root / "prepared" / f"{task}.json")

    def entry(self, label: str) -> Path:
        return self.inside(self.root / "train" / label)

    def unit(self, label: str, task: str, pass_: int | None = None) -> Path:
        """A training unit's folder; ``pass_`` for pool entries with more than one pass."""
        folder = self.inside(self.entry(label) / task)
        return folder / f"pass{pass_}" if pass_ is not None else folder

    def joint_unit(self, label: str) -> Path:
        return self.entry(label) / JOINT_UNIT

    def result_file(self, label: str, task: str) -> Path:
        """The result a task of an entry ends with (a pool entry's: the version kept)."""
        return self.unit(label, task) / "result.json"

    def delta_file(self, label: str, task: str, pass_: int | None = None) -> Path:
        return self.unit(label, task, pass_) / "delta.safetensors"

    def read_result(self, label: str, task: str) -> dict:
        return read_json(self.result_file(label, task))

    def joint_result(self, label: str) -> dict | None:
        p = self.joint_unit(label) / "result.json"
        return read_json(p) if p.is_file() else None

    def shared_weights(self, label: str) -> Path:
        return self.joint_unit(label) / "shared.safetensors"

    # ---------------------------------------------------------------- artefacts

    def bundle(self, label: str) -> Path:
        return self.inside(self.root / "bundles" / label)

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    def export(self, label: str, task: str) -> Path:
        return self.inside(self.exports / label / f"{task}.onnx")

    @property
    def base_export(self) -> Path:
        return self.exports / "base.onnx"

    @property
    def forms_file(self) -> Path:
        return self.exports / "forms.json"

    def rel(self, path: Path) -> str:
        return str(Path(path).relative_to(self.root))

    # ---------------------------------------------------------------- records and reports

    def stage_file(self, stage: str) -> Path:
        return self.inside(self.root / "stages" / f"{stage}.json")

    def record(self, stage: str) -> dict | None:
        p = self.stage_file(stage)
        return read_json(p) if p.is_file() else None

    def write_record(self, stage: str, record: dict) -> None:
        write_json(self.stage_file(stage), record)

    @property
    def results_file(self) -> Path:
        return self.root / "results.json"

    @property
    def report_file(self) -> Path:
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def bench_dir(self) -> Path:
        return self.root / "bench"

    def bench_file(self, name: str) -> Path:
        return self.inside(self.bench_dir / f"{name}.json")
