"""The images a task's exports are checked on: a few calibration images (INT8) and the test
split, streamed batch by batch (a real test split does not fit in memory at 224 px). Exact
checks (a graph against torch, a form against merged) only need to show the same function, so
they run on the first ``exact_limit`` test images; a lossy form's accuracy on all of them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np


@dataclass
class TaskImages:
    calibration: np.ndarray  # (N, 3, S, S) float32, normalised: a few train images
    batches: Callable[[], Iterable[np.ndarray]]  # the test images, normalised float32 batches; re-iterable
    labels: np.ndarray  # the test labels, in the batches' order
    exact_limit: int | None = None  # exact checks use the first this many test images (None: all)

    def exact_batches(self) -> Iterable[np.ndarray]:
        """The first ``exact_limit`` test images, in the same batches."""
        if self.exact_limit is None:
            yield from self.batches()
            return
        left = self.exact_limit
        for x in self.batches():
            if left <= 0:
                return
            yield x[:left]
            left -= len(x)

    def rest_batches(self) -> Iterable[np.ndarray]:
        """The test images after the first ``exact_limit``: with ``exact_batches``, all of them once."""
        if self.exact_limit is None:
            return
        skip = self.exact_limit
        for x in self.batches():
            if skip < len(x):
                yield x[skip:]
            skip = max(0, skip - len(x))

    @classmethod
    def from_arrays(cls, calibration: np.ndarray, test: np.ndarray, labels: np.ndarray, batch: int = 256) -> "TaskImages":
        return cls(calibration, lambda: (test[i : i + batch] for i in range(0, len(test), batch)), labels)


def logits(fn: Callable, batches: Iterable[np.ndarray]) -> np.ndarray:
    """A session's (``runner``'s) outputs over every batch, concatenated."""
    return np.concatenate([fn(np.ascontiguousarray(x, dtype=np.float32))[0] for x in batches])
