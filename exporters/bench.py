"""Measures every deployment form of a run's exports (``forms.json``) on this machine, as ratios
taken in one run: latency against the base and against the merged model, the time to bring a
task up, bytes on disk and resident memory for K tasks against K merged models.

Task switch (cold), per form, batch 1, median over tasks and repeats: the form brings the
task up from its files (``Form.bring_up``) and runs it once, with what the form keeps loaded
between tasks already resident (the switch form's session, the shared base weights):

* merged / fp16 / int8: load the task's model file into a new session;
* shared: new session whose base weights are already resident (``add_initializer``);
* switch: load the task's adapter file into the resident session.

Resident memory is measured in a fresh interpreter per form: RSS after loading the K
tasks and running each once, minus RSS before. Memory is read from ``/proc`` (Linux).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Callable

import numpy as np

from exporters.forms import FORMS
from exporters.latency import measure, runner
from exporters.loader import Loader


def switch_ms(loader: Loader, form: str, spec: dict, image_size: int, repeats: int) -> float:
    """Median ms to bring one task up from its files to its first answer (batch 1)."""
    f = FORMS[form]()
    x = np.zeros((1, 3, image_size, image_size), np.float32)
    resident = f.resident(loader, spec)
    times = []
    for _ in range(repeats):
        for task in spec["tasks"]:
            t0 = time.perf_counter()
            f.bring_up(loader, spec, task, resident)(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return median(times)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise OSError("no VmRSS in /proc/self/status")


def _resident(exports: str, form: str, spec: dict, image_size: int, threads: int) -> float:
    """MB of RSS that loading every task of ``spec`` (and one run each) adds to this process."""
    import onnxruntime  # noqa: F401  (the library's own footprint is not the form's)

    before = _rss_mb()
    loader = Loader(Path(exports), threads)
    x = np.zeros((1, 3, image_size, image_size), np.float32)
    keep = FORMS[form]().targets(loader, spec)
    for fn in keep.values():
        fn(x)
    return _rss_mb() - before


def resident_mb(exports: Path, form: str, spec: dict, image_size: int, threads: int) -> float | None:
    """``_resident`` in a fresh interpreter, so earlier sessions and allocator state do not count."""
    if not Path("/proc/self/status").exists():
        return None
    code = ("import json, sys; from exporters.bench import _resident; "
            "a = json.loads(sys.stdin.read()); print(_resident(*a))")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps([str(exports), form, spec, image_size, threads]),
                          capture_output=True, text=True, cwd=root, check=False)
    if done.returncode:
        raise RuntimeError(f"resident-memory probe failed: {done.stderr.strip()[-500:]}")
    return float(done.stdout.strip().splitlines()[-1])


def bench_forms(exports: Path, forms: dict, image_size: int, batch_sizes: list[int], warmup: int, runs: int,
                threads: int, providers: list[str] | None = None, memory: bool = True, switch_repeats: int = 3,
                log: Callable[[str], None] = print) -> dict:
    """Latency of every (method, form, task) and of the base, interleaved in one measure per batch
    size; then per (method, form): switch time, bytes on disk and resident memory for K tasks."""
    exports = Path(exports)
    loader = Loader(exports, threads, providers)
    specs = {(label, form): spec for label, m in forms["methods"].items() for form, spec in m.items()
             if "unavailable" not in spec}
    targets: dict[str, Callable] = {"base": runner(loader.open("base.onnx", shared=False))}
    for (label, form), spec in specs.items():
        for task, fn in FORMS[form]().targets(loader, spec).items():
            targets[f"{label}|{form}|{task}"] = fn
    latency = {}
    for bs in batch_sizes:
        log(f"bench forms: batch {bs}, {len(targets)} targets on {', '.join(loader.providers)}")
        latency[bs] = measure(targets, image_size, bs, warmup, runs)
    base_bytes = (exports / "base.onnx").stat().st_size
    out = {"providers": loader.providers, "base": {f"batch{bs}": latency[bs]["base"] for bs in batch_sizes},
           "base_bytes": base_bytes, "methods": {}}
    for (label, form), spec in specs.items():
        tasks = list(spec["tasks"])
        row = {"tasks": len(tasks), "bytes": spec.get("bytes"), "latency": {}}
        for bs in batch_sizes:
            ms = median(latency[bs][f"{label}|{form}|{t}"]["median_ms"] for t in tasks)
            merged = median(latency[bs][f"{label}|merged|{t}"]["median_ms"] for t in tasks)
            row["latency"][f"batch{bs}"] = {"median_ms": ms, "ratio_to_base": ms / latency[bs]["base"]["median_ms"],
                                            "ratio_to_merged": ms / merged}
        row["switch_ms"] = switch_ms(loader, form, spec, image_size, switch_repeats)
        if memory:
            row["resident_mb"] = resident_mb(exports, form, spec, image_size, threads)
        out["methods"].setdefault(label, {})[form] = row
        log(f"  {label}/{form}: {row['bytes']:,} bytes for {len(tasks)} tasks, switch {row['switch_ms']:.1f} ms"
            + (f", resident {row['resident_mb']:.1f} MB" if row.get("resident_mb") is not None else ""))
    for label, rows in out["methods"].items():
        ref = rows["merged"]
        for row in rows.values():
            row["bytes_vs_merged"] = row["bytes"] / ref["bytes"]
            if row.get("resident_mb") is not None and ref.get("resident_mb"):
                row["resident_vs_merged"] = row["resident_mb"] / ref["resident_mb"]
    return out
