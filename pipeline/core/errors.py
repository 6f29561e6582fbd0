"""The one base class of every error a user can act on.

The CLI prints a ``TaskfoldError`` as ``taskfold: error: <message>`` and exits 2; anything
else is a bug and keeps its traceback. Each layer defines its own subclasses (a config, a
bundle, a backbone, the data) whose messages name the file, field, tensor or unit at fault.
"""
from __future__ import annotations


class TaskfoldError(Exception):
    """A problem with the user's input or machine, not with taskfold; the message says what to fix."""


class BundleError(TaskfoldError, ValueError):
    """A bundle or delta file that cannot be trusted or used; the message names the file."""
