"""Latency of onnxruntime sessions: warm-up, then median and p90 over many timed runs.

Sessions are timed in rounds, in a new (seeded) order each round and with one untimed run
after every switch, so drift and cache effects hit all of them alike and ratios measured
in one call (merged / base) are fair.
"""
from __future__ import annotations

import time

import numpy as np


def _stats(ms: list[float], batch_size: int) -> dict[str, float]:
    return {"batch": batch_size, "median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "mean_ms": float(np.mean(ms)), "runs": len(ms)}


def measure(sessions: dict[str, object], image_size: int, batch_size: int, warmup: int = 10, runs: int = 50,
            rounds: int = 5) -> dict[str, dict]:
    """Milliseconds per ``run`` call for each session, on one fixed random batch."""
    x = np.random.default_rng(0).standard_normal((batch_size, 3, image_size, image_size), dtype=np.float32)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[k])
    per_round = max(1, runs // rounds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    rng = np.random.default_rng(0)
    names = list(sessions)
    for _ in range(rounds):
        for k in rng.permutation(names):
            s = sessions[k]
            s.run(None, feeds[k])  # untimed: the first call after a switch pays for cold caches
            for _ in range(per_round):
                t0 = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: _stats(v, batch_size) for k, v in times.items()}
