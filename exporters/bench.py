"""Measures every deployment form of a run's exports (``forms.json``) on this machine, as ratios
taken in one run: latency against the base and against the merged model, the time to bring a
task up, bytes on disk and resident memory for K tasks against K merged models.

Task switch (cold), per form, batch 1, median over tasks and repeats: the form brings the
task up from its files (``Form.bring_up``) and runs it once, with what the form keeps loaded
between tasks already resident (the switch form's session, the shared base weights). It is
timed in the form's own probe process (below), as a server running that form would see it,
not beside the sessions of every other target:

* merged / fp16 / int8: load the task's model file into a new session;
* shared: new session whose base weights are already resident (``add_initializer``);
* switch: load the task's adapter file into the resident session;
* live: read the task's tensors from its file into the resident session's buffers;
* bound: bind the task's tensors, which the resident session holds for every task.

Alone in its process, a form that serves every task from one session (switch, live, bound)
lets that session's thread pool spin between runs, as onnxruntime does by default and as a
server running it would; forms with a session per task keep their pools asleep.

Resident memory (then the switch) is measured in a fresh process per form: RSS after loading the K tasks and
running each once, minus RSS before. The processes are forked from one server that has
imported onnxruntime already (multiprocessing's forkserver with preloaded modules), so a probe
costs a fork, not an interpreter start. Memory is read from ``/proc`` (Linux). Loading frees
much of what it allocates (model protos, load-time copies), and glibc keeps freed heap in the
process: ``resident_mb`` is read after handing it back (``malloc_trim``, what a server does
after loading its tasks), ``resident_untrimmed_mb`` before. Without it, allocator slack decides
the figure (a merged EfficientNet-Lite0 session here: 26-31 MB, against 16 MB it holds). Pages
of library code (onnxruntime's kernels, numpy) that the first runs touch are left out and
reported apart (``library_code_mb``, 1.8-2.6 MB here): every process that maps the libraries
shares them, whichever form it runs. ``resident_vs_stored`` sets the figure against the fewest
bytes any exact form stores for the K tasks (the base once plus the tasks' own tensors).
"""
from __future__ import annotations

import ctypes
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from statistics import median
from typing import Callable

import numpy as np

from exporters.forms import FORMS
from exporters.latency import measure, runner
from exporters.loader import Loader


def switch_ms(loader: Loader, form: str, spec: dict, image_size: int, repeats: int) -> float:
    """Median ms to bring one task up from its files to its first answer (batch 1). The last task
    is brought up once untimed first, so what a form keeps loaded between tasks (the shared base
    weights, the live session's buffers) is in place, and the first timed task is a switch."""
    f = FORMS[form]()
    x = np.zeros((1, 3, image_size, image_size), np.float32)
    resident = f.resident(loader, spec)
    f.bring_up(loader, spec, list(spec["tasks"])[-1], resident)(x)
    times = []
    for _ in range(repeats):
        for task in spec["tasks"]:
            t0 = time.perf_counter()
            f.bring_up(loader, spec, task, resident)(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return median(times)


def _memory_mb() -> tuple[float, float]:
    """(MB resident in this process, of which library code): RSS per mapping from
    ``/proc/self/smaps``; library code is every mapping of a file that is mapped executable
    somewhere (shared objects and the interpreter, their code and read-only data). Those pages
    are the libraries', shared by every process that maps them and touched by whichever kernels
    a model first runs, so a form is not charged for them."""
    rss: dict[str, int] = {}
    executable: set[str] = set()
    name = ""
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):  # a mapping: range perms offset dev inode [path]
                name = head[5] if len(head) > 5 else ""
                if name.startswith("/") and "x" in head[1]:
                    executable.add(name)
            elif head[0] == "Rss:":
                rss[name] = rss.get(name, 0) + int(head[1])
    if not rss:
        raise OSError("no mappings in /proc/self/smaps")
    return sum(rss.values()) / 1024, sum(v for k, v in rss.items() if k in executable) / 1024


def release_freed_heap() -> bool:
    """Hand the heap memory this process has freed back to the OS (glibc's ``malloc_trim``);
    False where there is no glibc."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


def _warm_onnxruntime(threads: int) -> None:
    """One session of a one-node graph, run once: what any first session costs a process
    (onnxruntime's environment, kernel registry, thread pools), whatever its model."""
    import onnx

    from exporters.runtime import onnxruntime

    ort = onnxruntime()
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "warm", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, {"x": np.zeros((1, 4), np.float32)})


def _resident(exports: str, form: str, spec: dict, image_size: int, threads: int) -> tuple[float, float, float]:
    """MB of RSS that loading every task of ``spec`` (and one run each) adds to this process,
    library code left out (``_memory_mb``): after its freed heap is handed back to the OS, and
    before; and the library code those first runs touched."""
    _warm_onnxruntime(threads)  # the library's own footprint (its first session sets up globals) is not the form's
    release_freed_heap()
    total0, code0 = _memory_mb()
    loader = Loader(Path(exports), threads, spinning=FORMS[form].one_session)
    x = np.zeros((1, 3, image_size, image_size), np.float32)
    keep = FORMS[form]().targets(loader, spec)
    for fn in keep.values():
        fn(x)
    total, code = _memory_mb()
    untrimmed = (total - code) - (total0 - code0)
    release_freed_heap()
    total, code = _memory_mb()
    return (total - code) - (total0 - code0), untrimmed, code - code0


def _probe(exports: str, form: str, spec: dict, image_size: int, threads: int, repeats: int,
           providers: list[str] | None = None) -> tuple[float, float, float, float]:
    """``_resident``, then ``switch_ms``, in this process: a form as a server runs it, alone. In
    the bench's own process the sessions of every other target (some 250 on the quickstart) are
    loaded too, and a bound or live switch, one answer, read 1.5-2x what it reads alone. Alone,
    a form that runs one session for every task lets its thread pool spin between runs
    (onnxruntime's default; ``Form.one_session``): a bound switch read 0.6-0.9x what it reads
    with the pool asleep. A session per task keeps its pool asleep (bringing a merged session up
    took the same time either way, within 2%). The latency table times every target asleep."""
    memory = _resident(exports, form, spec, image_size, threads)
    loader = Loader(Path(exports), threads, providers, spinning=FORMS[form].one_session)
    return (*memory, switch_ms(loader, form, spec, image_size, repeats))


def memory_probes() -> ProcessPoolExecutor | None:
    """A pool whose every probe runs in a process of its own, forked from a server with
    onnxruntime and this module imported; None where ``/proc`` or forkserver is missing."""
    if not Path("/proc/self/status").exists() or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["onnxruntime", "exporters.bench"])
    return ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1)


def probe_form(probes: ProcessPoolExecutor, exports: Path, form: str, spec: dict, image_size: int, threads: int,
               repeats: int, providers: list[str] | None = None) -> tuple[float, float, float, float]:
    """``_probe`` in a process of its own, so earlier sessions and allocator state do not count:
    resident MB (trimmed, untrimmed, library code) and switch ms."""
    try:
        return probes.submit(_probe, str(exports), form, spec, image_size, threads, repeats, providers).result()
    except Exception as err:  # the probe's own error, with its type: a bench must say why a figure is missing
        raise RuntimeError(f"memory and switch probe of {form} failed: {type(err).__name__}: {err}") from err


def bench_forms(exports: Path, forms: dict, image_size: int, batch_sizes: list[int], warmup: int, runs: int,
                threads: int, providers: list[str] | None = None, memory: bool = True, switch_repeats: int = 3,
                log: Callable[[str], None] = print) -> dict:
    """Latency of every (method, form, task) and of the base (twice: the noise floor), interleaved
    in one measure per batch size (``measured``: ``batch<N>`` -> ``label|form|task`` -> its figures);
    then per (method, form): switch time, bytes on disk and resident memory for K tasks."""
    exports = Path(exports)
    loader = Loader(exports, threads, providers)
    specs = {(label, form): spec for label, m in forms["methods"].items() for form, spec in m.items()
             if "unavailable" not in spec}
    if loader.providers[0] != "CPUExecutionProvider":
        if cpu := sorted({form for _, form in specs if FORMS[form].cpu_only}):
            log(f"bench forms: {', '.join(cpu)} left out: built for the CPU, not {loader.providers[0]}")
        specs = {k: v for k, v in specs.items() if not FORMS[k[1]].cpu_only}
    t0 = time.perf_counter()
    targets: dict[str, Callable] = {"base": runner(loader.open("base.onnx", shared=False)),
                                    "base_repeat": runner(loader.open("base.onnx", shared=False))}  # the noise floor
    for (label, form), spec in specs.items():
        for task, fn in FORMS[form]().targets(loader, spec).items():
            targets[f"{label}|{form}|{task}"] = fn
    seconds = {"open": time.perf_counter() - t0}
    latency = {}
    for bs in batch_sizes:
        log(f"bench forms: batch {bs}, {len(targets)} targets on {', '.join(loader.providers)}")
        t0 = time.perf_counter()
        latency[bs] = measure(targets, image_size, bs, warmup, runs)
        seconds[f"latency_batch{bs}"] = time.perf_counter() - t0
    base_bytes = (exports / "base.onnx").stat().st_size
    out = {"providers": loader.providers, "base": {f"batch{bs}": latency[bs]["base"] for bs in batch_sizes},
           "base_bytes": base_bytes, "methods": {},
           "measured": {f"batch{bs}": latency[bs] for bs in batch_sizes}}
    probes = memory_probes() if memory else None
    t0 = time.perf_counter()
    try:
        _rows(out, specs, exports, loader, latency, batch_sizes, image_size, threads, probes, switch_repeats, log)
    finally:
        if probes is not None:
            probes.shutdown()
    seconds["memory_and_switch"] = time.perf_counter() - t0
    out["seconds"] = {k: round(v, 2) for k, v in seconds.items()}  # where the bench's time goes
    for label, rows in out["methods"].items():
        ref = rows["merged"]
        least = min(row["bytes"] for form, row in rows.items() if not FORMS[form].lossy)
        for row in rows.values():
            row["bytes_vs_merged"] = row["bytes"] / ref["bytes"]
            if row.get("resident_mb") is not None and ref.get("resident_mb"):
                row["resident_vs_merged"] = row["resident_mb"] / ref["resident_mb"]
                row["resident_vs_stored"] = row["resident_mb"] * 2**20 / least
    return out


def _rows(out: dict, specs: dict, exports: Path, loader: Loader, latency: dict, batch_sizes: list[int],
          image_size: int, threads: int, probes, switch_repeats: int, log: Callable[[str], None]) -> None:
    """One row per (method, form): latency ratios, switch time, bytes, resident memory."""
    for (label, form), spec in specs.items():
        tasks = list(spec["tasks"])
        row = {"tasks": len(tasks), "bytes": spec.get("bytes"), "latency": {}}
        for bs in batch_sizes:
            ms = median(latency[bs][f"{label}|{form}|{t}"]["median_ms"] for t in tasks)
            merged = median(latency[bs][f"{label}|merged|{t}"]["median_ms"] for t in tasks)
            row["latency"][f"batch{bs}"] = {"median_ms": ms, "ratio_to_base": ms / latency[bs]["base"]["median_ms"],
                                            "ratio_to_merged": ms / merged}
        if probes is not None:
            (row["resident_mb"], row["resident_untrimmed_mb"], row["library_code_mb"],
             row["switch_ms"]) = probe_form(probes, exports, form, spec, image_size, threads, switch_repeats,
                                            loader.providers)
            row["switch_process"] = "own"
        else:  # no /proc or forkserver, or memory not asked for (a GPU provider): with every target loaded
            row["switch_ms"] = switch_ms(loader, form, spec, image_size, switch_repeats)
            row["switch_process"] = "bench"
        out["methods"].setdefault(label, {})[form] = row
        log(f"  {label}/{form}: {row['bytes']:,} bytes for {len(tasks)} tasks, switch {row['switch_ms']:.1f} ms"
            + (f", resident {row['resident_mb']:.1f} MB" if row.get("resident_mb") is not None else ""))
