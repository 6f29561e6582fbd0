"""taskfold pipeline: training and folding (torch only)."""
