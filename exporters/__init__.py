"""Deployment: reads bundles, writes and measures artefacts. Knows nothing of training.

``exporters.export(bundle, out, forms=[...])`` exports a bundle on its own (``exporters.bundles``);
the forms are one module each in ``exporters/forms`` (their registry: ``exporters.forms.FORMS``)."""


def __getattr__(name):  # lazily: importing the package loads neither torch nor onnxruntime
    if name in ("export", "export_bundles", "read_metadata"):
        from exporters import bundles as module

        return getattr(module, name)
    raise AttributeError(f"module 'exporters' has no attribute {name!r}")
