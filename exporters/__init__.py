"""Deployment: reads bundles, writes and measures artefacts. Knows nothing of training."""
