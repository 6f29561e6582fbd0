"""The records a training unit leaves: ``result.json`` of a task, and of a joint unit. Written in
one place, so every unit reports the same fields with the same formulas."""
from __future__ import annotations


def step_ms(steps: int, step_seconds: float) -> float:
    """Mean wall time of one optimiser step."""
    return round(1e3 * step_seconds / max(1, steps), 2)


def task_result(h: str, entry, task: str, val_acc: float, test_acc: float, history: list, train_seconds: float,
                step_time: float, fold_check: dict, facts, joint: bool = False,
                skipped: dict[str, str] | None = None) -> dict:
    out = {"hash": h, "method": entry.name, "label": entry.label, "task": task}
    if joint:
        out["joint"] = True
    out |= {"val_acc": val_acc, "test_acc": test_acc, "history": history,
            "train_seconds": round(train_seconds, 2), "step_ms": step_time, "fold_check": fold_check,
            "describe": facts.model_dump(mode="json", exclude_none=True)}
    if skipped:  # images that could not be decoded (data.on_bad_image: skip), never silently
        out["skipped_images"] = skipped
    return out
