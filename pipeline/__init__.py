"""taskfold pipeline: training and folding (torch only)."""

__version__ = "0.2.0"
