"""Which onnxruntime is installed, and which execution providers it can really run.

onnxruntime (extra ``cpu``) and onnxruntime-gpu (extra ``gpu``) install the same module, so
taskfold depends on neither directly: these checks turn a missing runtime or a provider that
cannot load into one clear error before any work is done.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import TaskfoldError

CPU_INSTALL = "bash scripts/setup.sh (pip: taskfold[cpu])"
GPU_INSTALL = "bash scripts/setup.sh --gpu (pip: taskfold[gpu])"
GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}


class RuntimeUnavailable(TaskfoldError, RuntimeError):
    """onnxruntime, or an execution provider asked for, is not usable on this machine."""


def onnxruntime():
    """The onnxruntime module, or a RuntimeUnavailable that says how to install one."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise RuntimeUnavailable(f"onnxruntime is not installed ({err}); install one: {CPU_INSTALL}, or {GPU_INSTALL}") from err
    return ort


def check_providers(providers: list[str]) -> None:
    """Refuse providers this onnxruntime build does not have (the CPU wheel has no CUDA). For
    GPU providers, first load the CUDA and cuDNN libraries that torch's CUDA build installed."""
    ort = onnxruntime()
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise RuntimeUnavailable(
            f"{', '.join(missing)} not in this onnxruntime build ({_build(ort)}, providers: "
            f"{', '.join(ort.get_available_providers())}); for CUDA and TensorRT: {GPU_INSTALL}")
    if GPU_PROVIDERS.intersection(providers) and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def check_session(sess, providers: list[str]) -> None:
    """onnxruntime falls back to the next provider, with a log line only, when one fails to
    load (no driver, no GPU, a library missing): a benchmark must not silently time the CPU."""
    wanted = providers[0]
    if wanted not in sess.get_providers():
        raise RuntimeUnavailable(
            f"{wanted} did not load ({_build(onnxruntime())}; the session runs on {', '.join(sess.get_providers())}). "
            "It needs an NVIDIA GPU with its driver, and CUDA 13 / cuDNN 9 libraries (torch's CUDA build brings them)")


def _build(ort) -> str:
    from importlib.metadata import PackageNotFoundError, distribution

    for name in ("onnxruntime-gpu", "onnxruntime"):
        try:
            return f"{name} {distribution(name).version}"
        except PackageNotFoundError:
            continue
    return f"onnxruntime {ort.__version__}"


def session(path: Path, threads: int = 0, providers: list[str] | None = None, spinning: bool = False,
            initializers: dict | None = None):
    """An onnxruntime session. Spinning is off by default: with many sessions alive (one per
    task), idle pools that spin-wait steal the cores from the one that runs. ``initializers``
    (name -> OrtValue) replace the graph's own, so sessions can share one copy of the base.
    A provider that cannot run here is an error (``RuntimeUnavailable``), not a silent CPU fallback."""
    providers = providers or ["CPUExecutionProvider"]
    check_providers(providers)
    ort = onnxruntime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # adapter graphs warn once per overridable initializer
    for name, value in (initializers or {}).items():
        opts.add_initializer(name, value)
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    check_session(sess, providers)
    sess.shared_initializers = initializers  # onnxruntime does not copy them: they live as long as the session
    return sess
