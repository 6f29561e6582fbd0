"""Version ids of a pool method's units: ``<task>@<pass>``.

A method that trains the tasks more than once (CWPS's multi-task passes) keeps every pass's
delta as a *version*; pointers into the pool name versions. This module is the one place that
builds and reads the id, shared by the run directory, the pool scheduler and the methods.
"""
from __future__ import annotations

SEPARATOR = "@"


def version_id(task: str, pass_: int) -> str:
    return f"{task}{SEPARATOR}{pass_}"


def version_task(version: str) -> str:
    """The task a version id belongs to ("base" and other plain names map to themselves)."""
    return version.rsplit(SEPARATOR, 1)[0]


def version_pass(version: str) -> int:
    return int(version.rsplit(SEPARATOR, 1)[1])
