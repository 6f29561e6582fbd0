"""Who borrows from whom (the CWPS paper's Figure 4, right): rows are the borrowing tasks,
columns where each of its channels comes from: its own trained rows, the pretrained base, or
another task's rows (owners, so a row that task B borrowed from A counts for A)."""
from __future__ import annotations

from pathlib import Path

from pipeline.core.plotting import pyplot, save_png
from pipeline.core.text import md_table
from pipeline.core.versions import version_task
from pipeline.core.delta import BASE_SOURCE
from pipeline.methods.base import ReportSection


def relation(facts: dict) -> dict:
    """The matrix from every task's ``CwpsFacts``: channels per source column."""
    tasks = list(facts)
    rows = {}
    for task, f in facts.items():
        counts = {"own": sum(f.own_channels), BASE_SOURCE: 0} | {t: 0 for t in tasks}
        for owner, n in f.borrowed.items():
            counts[owner if owner == BASE_SOURCE else version_task(owner)] += n
        rows[task] = {"channels": sum(f.channels), "counts": counts}
    return {"columns": ["own", BASE_SOURCE, *tasks], "rows": rows}


def table(rel: dict) -> list[str]:
    cols = rel["columns"]
    rows = []
    for task, r in rel["rows"].items():
        share = [100 * r["counts"][c] / max(1, r["channels"]) for c in cols]
        rows.append([task, f"{r['channels']:,}", *(f"{s:.1f}" for s in share)])
    return md_table(["task (borrower)", "channels", *(f"{c} %" for c in cols)], rows)


def relation_section(label: str, rel: dict, plot_dir: Path) -> ReportSection:
    name = f"task_relation_{label}.png"
    plot_relation(label, rel, plot_dir / name)
    lines = ["", "Where each task's channels come from (% of its shared-layer channels; a borrowed row counts "
                 "for the task that trained it):", ""] + table(rel)
    return ReportSection(lines, {f"{label}: where each task's channels come from": name})


def plot_relation(label: str, rel: dict, path: Path) -> None:
    import numpy as np

    plt = pyplot()

    tasks, cols = list(rel["rows"]), rel["columns"]
    grid = np.array([[100 * rel["rows"][t]["counts"][c] / max(1, rel["rows"][t]["channels"]) for c in cols]
                     for t in tasks])
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(cols), 1.2 + 0.55 * len(tasks)))
    im = ax.imshow(grid, cmap="Blues", vmin=0, vmax=100, aspect="auto")
    for i in range(len(tasks)):
        for j in range(len(cols)):
            ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if grid[i, j] > 55 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_xlabel("where the channel's row comes from")
    ax.set_ylabel("task")
    ax.set_title(f"{label}: % of each task's channels by source", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    save_png(fig, path)
