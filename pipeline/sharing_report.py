"""Who borrows from whom, and what passes over the tasks bought.

The task-relation matrix of a channel-sharing method (the CWPS paper's Figure 4, right): rows
are the borrowing tasks, columns where each of its channels comes from: its own trained rows,
the pretrained base, or another task's rows (owners, so a row that task B borrowed from A
counts for A). The passes table: every pass's accuracy and size per task, and the one kept."""
from __future__ import annotations

from pathlib import Path

from pipeline.plotting import pyplot, save_png


def relation(method: dict) -> dict | None:
    """The matrix from the results of one method entry; None if it does not share channels."""
    tasks = list(method["tasks"])
    rows = {}
    for task, r in method["tasks"].items():
        d = r["describe"]
        if "borrowed" not in d:
            return None
        counts = {"own": sum(d["own_channels"]), "base": 0} | {t: 0 for t in tasks}
        for owner, n in d["borrowed"].items():
            counts[owner if owner == "base" else owner.rsplit("@", 1)[0]] += n
        rows[task] = {"channels": sum(d["channels"]), "counts": counts}
    return {"columns": ["own", "base", *tasks], "rows": rows}


def table(rel: dict) -> list[str]:
    cols = rel["columns"]
    lines = ["| task (borrower) | channels | " + " | ".join(f"{c} %" for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for task, r in rel["rows"].items():
        share = [100 * r["counts"][c] / max(1, r["channels"]) for c in cols]
        lines.append(f"| {task} | {r['channels']:,} | " + " | ".join(f"{s:.1f}" for s in share) + " |")
    return lines


def passes_table(method: dict) -> list[str]:
    """Test accuracy / stored params of every pass per task, and the version kept (multi-pass
    methods; empty otherwise)."""
    tasks = method["tasks"]
    if not all("passes" in t for t in tasks.values()):
        return []
    n = len(next(iter(tasks.values()))["passes"])
    lines = ["| task | " + " | ".join(f"pass {p}" for p in range(1, n + 1)) + " | kept |", "|---|" + "---|" * (n + 1)]
    for name, t in tasks.items():
        lines.append(f"| {name} | " + " | ".join(f"{p['test_acc']:.4f} / {p['params']:,}" for p in t["passes"])
                     + f" | {t['kept']} |")
    return lines


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
