"""The data layer's user error."""
from __future__ import annotations

from pipeline.core.errors import TaskfoldError


class DataError(TaskfoldError, ValueError):
    """A task whose data cannot be read; the message names the task and the file."""
