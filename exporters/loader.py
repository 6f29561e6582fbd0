"""Opens the files of one exports folder as onnxruntime sessions, base weights shared.

Paths in ``forms.json`` are relative to the exports folder; the shared folder may be read
where it is being written (``shared_dir``), so forms are checked before it moves into place.
"""
from __future__ import annotations

from pathlib import Path

from exporters.datafiles import SHARED
from exporters.runtime import session
from exporters.weights import SharedWeights

CPU = ["CPUExecutionProvider"]


class Loader:
    def __init__(self, exports: Path, threads: int, providers: list[str] | None = None, shared_dir: Path | None = None,
                 spinning: bool = False):
        self.exports = Path(exports)
        self.threads = threads
        self.spinning = spinning  # onnxruntime's thread pools spin between runs (``exporters.runtime.session``)
        self.providers = providers or CPU
        self.shared_dir = Path(shared_dir) if shared_dir is not None else self.exports / SHARED
        self.weights = SharedWeights(self.shared_dir) if self.shared_dir.is_dir() else None

    def path(self, rel: str) -> Path:
        """Where a file named in ``forms.json`` is now."""
        head, _, rest = rel.partition("/")
        return self.shared_dir / rest if head == SHARED and rest else self.exports / rel

    def open(self, rel: str, shared: bool = False):
        """A session of ``rel``; ``shared``: its base weights are the ones every session shares."""
        path = self.path(rel)
        init = self.weights.initializers(path) if shared and self.weights is not None else None
        return session(path, self.threads, self.providers, self.spinning, initializers=init)
