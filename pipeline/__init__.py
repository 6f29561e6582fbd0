"""taskfold pipeline: training and folding (torch only)."""

__version__ = "0.3.0"
