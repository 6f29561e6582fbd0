"""taskfold: train small task-specific parts on one pretrained backbone, fold them into per-layer
deltas, ship them compactly. ``pipeline.run(config)`` and ``pipeline.load_bundle(path)`` are the
API (``pipeline.api``); the layers below are ``core``, ``data``, ``methods``, ``training``."""

__version__ = "0.4.0"


def __getattr__(name):  # the API loads torch; importing ``pipeline`` for its version must not
    if name in ("load_bundle", "run", "LoadedBundle", "TaskModel"):
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
