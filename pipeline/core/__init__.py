"""The bottom layer: the delta vocabulary, bundle, ledger, backbones, blocks, comparisons and
file helpers. Imports nothing else of taskfold, so exporters and tools can stand on it alone."""
