"""Latency of onnxruntime sessions: warm-up, then median and p90 over many timed runs.

Targets are timed in rounds, in a new (seeded) order each round and with one untimed run
after every switch, so drift and cache effects hit all of them alike and ratios measured
in one call (merged / base) are fair. A target is a session, or a session with run options
(an active adapter), wrapped by ``runner``.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

Runner = Callable[[np.ndarray], object]


def runner(sess, run_options=None) -> Runner:
    """``x -> outputs`` for a session (and its run options, e.g. an active adapter)."""
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x}, run_options)


def batched_logits(target, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Logits of a session or a ``runner``-like callable over ``x`` in batches."""
    fn = target if callable(target) else runner(target)
    return np.concatenate([fn(x[i : i + batch])[0] for i in range(0, len(x), batch)])


def _stats(ms: list[float], batch_size: int) -> dict[str, float]:
    return {"batch": batch_size, "median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "mean_ms": float(np.mean(ms)), "runs": len(ms)}


def measure(targets: dict[str, object], image_size: int, batch_size: int, warmup: int = 10, runs: int = 50,
            rounds: int = 5) -> dict[str, dict]:
    """Milliseconds per call for each target (a session or a ``runner``), on one fixed random batch."""
    x = np.random.default_rng(0).standard_normal((batch_size, 3, image_size, image_size), dtype=np.float32)
    fns = {k: t if callable(t) else runner(t) for k, t in targets.items()}
    for fn in fns.values():
        for _ in range(warmup):
            fn(x)
    rounds = max(1, min(rounds, runs))
    per_round = [runs // rounds + (1 if r < runs % rounds else 0) for r in range(rounds)]  # exactly ``runs`` each
    times: dict[str, list[float]] = {k: [] for k in fns}
    rng = np.random.default_rng(0)
    for n in per_round:
        for k in rng.permutation(list(fns)):
            fn = fns[k]
            fn(x)  # untimed: the first call after a switch pays for cold caches
            for _ in range(n):
                t0 = time.perf_counter()
                fn(x)
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: _stats(v, batch_size) for k, v in times.items()}
