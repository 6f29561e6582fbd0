"""The storage ledger: what each task costs, in params, bits and bytes on disk.

``N x base`` follows the papers' tables: (shared base params still in use + every task's
stored params) / base params. A base tensor that every task replaces (fine-tune) is not
"in use", so K fine-tuned tasks come to about K x base, a linear probe to about 1 x base.
Params count every stored value (weights and norm statistics), base and tasks alike.
"""
from __future__ import annotations

import struct
from pathlib import Path

import torch

from pipeline.core.delta import TaskDelta


def safetensors_payload(path: Path) -> tuple[int, int]:
    """(file bytes, tensor payload bytes) of a safetensors file: size minus its JSON header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    return size, size - 8 - header_len


def _covered_keys(delta: TaskDelta) -> set[str]:
    return {f"{path}.{name}" for path, d in delta.entries.items() for name in d.covers()}


def build_ledger(base_state: dict[str, torch.Tensor], deltas: list[TaskDelta], files: dict[str, Path]) -> dict:
    """Ledger for a bundle: base, per task (by kind), totals. ``files``: 'base' and task names."""
    floats = {k: v for k, v in base_state.items() if v.is_floating_point()}
    base_params = sum(v.numel() for v in floats.values())
    base_bits = sum(v.numel() * v.element_size() * 8 for v in floats.values())
    covered_by_all = set.intersection(*(_covered_keys(d) for d in deltas)) if deltas else set()
    shared_in_use = sum(v.numel() for k, v in floats.items() if k not in covered_by_all)
    base_bytes, base_payload = safetensors_payload(files["base"])
    tasks = {}
    for d in deltas:
        size, payload = safetensors_payload(files[d.task])
        tasks[d.task] = {
            "params": d.params(),
            "bits": d.bits(),
            "fraction_of_base": d.params() / base_params,
            "bytes_on_disk": size,
            "payload_bytes": payload,
            "by_kind": d.by_kind(),
        }
    task_params = sum(t["params"] for t in tasks.values())
    return {
        "base": {"params": base_params, "bits": base_bits, "bytes_on_disk": base_bytes, "payload_bytes": base_payload,
                 "params_in_use": shared_in_use},
        "tasks": tasks,
        "total": {
            "params": shared_in_use + task_params,
            "bytes_on_disk": base_bytes + sum(t["bytes_on_disk"] for t in tasks.values()),
            "n_x_base": (shared_in_use + task_params) / base_params,
        },
    }


def format_ledger(ledger: dict, title: str = "") -> str:
    """A fixed-width storage table for the terminal (``taskfold inspect``)."""
    rows = [("part", "params", "bits", "bytes on disk", "x base")]
    b = ledger["base"]
    rows.append(("base (shared)", f"{b['params']:,}", f"{b['bits']:,}", f"{b['bytes_on_disk']:,}", "1.000"))
    for name, t in ledger["tasks"].items():
        rows.append((name, f"{t['params']:,}", f"{t['bits']:,}", f"{t['bytes_on_disk']:,}", f"{t['fraction_of_base']:.4f}"))
    tot = ledger["total"]
    rows.append(("total (N x base)", f"{tot['params']:,}", "", f"{tot['bytes_on_disk']:,}", f"{tot['n_x_base']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [title] if title else []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    kinds = {}
    for t in ledger["tasks"].values():
        for k, v in t["by_kind"].items():
            kinds.setdefault(k, [0, 0])
            kinds[k][0] += v["params"]
            kinds[k][1] += v["bits"]
    lines.append("by kind, all tasks: " + ", ".join(f"{k} {p:,} params / {bits:,} bits" for k, (p, bits) in kinds.items()))
    return "\n".join(lines)
