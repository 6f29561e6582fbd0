"""What a select-or-skip policy learned, and what it saves (AdaShare's part of the report).

The policy heat map and task correlation are the AdaShare paper's Figures 3 and 4: per task
and skippable block the learned probability of executing it, and the cosine similarity of
the tasks' policy logits. The table lists the blocks each task skips in the architecture
kept, with the compute (FLOPs) and latency of its merged model against the full base.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.core.plotting import pyplot, save_png
from pipeline.core.text import fmt, md_table
from pipeline.methods.base import ReportSection


def _short(block: str) -> str:
    return block.removeprefix("features.")


def skip_table(facts: dict, entry: dict) -> list[str]:
    rows = []
    for task, f in facts.items():
        t = entry["tasks"][task]
        skipped = [_short(b) for b, run in zip(f.blocks, f.executed) if not run]
        lat = next(iter(t["latency"].values()), {}).get("ratio_to_base")
        rows.append([task, f"{len(skipped)}/{len(f.blocks)}", ", ".join(skipped) or "-", fmt(t.get("flops_ratio"), ".3f"),
                     fmt(lat, ".3f"), f"{t['test_acc']:.4f}"])
    return md_table(["task", "blocks skipped", "skipped", "FLOPs x base", "latency x base (b1)", "test acc"], rows)


def correlation(facts: dict) -> tuple[list[str], list[list[float]]] | None:
    """Cosine similarity of the tasks' flattened (execute, skip) policy logits."""
    import numpy as np

    tasks = [t for t, f in facts.items() if f.policy_logits is not None]
    if len(tasks) < 2:
        return None
    vecs = np.array([np.ravel(facts[t].policy_logits) for t in tasks])
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    unit = vecs / np.where(norms == 0, 1, norms)
    return tasks, (unit @ unit.T).round(4).tolist()


def policy_section(facts: dict, label: str, entry: dict, plot_dir: Path) -> ReportSection:
    joint = entry.get("joint", {})
    kept = joint.get("kept_candidate")
    tried = ", ".join(f"#{x['candidate']}: {x['mean_val_acc']:.4f}" for x in joint.get("candidates", []))
    lines = ["", f"Blocks each task skips (architecture #{kept} kept of those retrained, mean val acc {tried}); "
                 "FLOPs and latency of the merged model against the full base:", ""] + skip_table(facts, entry)
    name = f"policy_{label}.png"
    plot_policy(label, facts, plot_dir / name)
    return ReportSection(lines, {f"{label}: learned policy and task correlation": name})


def plot_policy(label: str, facts: dict, path: Path) -> None:
    """Left: p(execute) per task and block after the search, x where the kept architecture
    skips. Right: the task correlation matrix."""
    import numpy as np

    plt = pyplot()
    tasks = list(facts)
    blocks = [_short(b) for b in facts[tasks[0]].blocks]
    grid = np.array([facts[t].p_execute if facts[t].p_execute is not None else [np.nan] * len(blocks) for t in tasks])
    corr = correlation(facts)
    fig, axes = plt.subplots(1, 2, figsize=(6 + 0.45 * len(blocks), 1.6 + 0.5 * len(tasks)),
                             gridspec_kw={"width_ratios": [max(2, len(blocks)), max(2, len(tasks))]})
    ax = axes[0]
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    for i, t in enumerate(tasks):
        for j, run in enumerate(facts[t].executed):
            if not run:
                ax.text(j, i, "x", ha="center", va="center", color="white", fontsize=10, fontweight="bold")
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_xticks(range(len(blocks)), blocks, rotation=60, ha="right", fontsize=7)
    ax.set_title(f"{label}: p(execute) per block (x: skipped)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax = axes[1]
    if corr is not None:
        names, matrix = corr
        ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title("task correlation (policy logits)", fontsize=9)
    else:
        ax.axis("off")
    fig.tight_layout()
    save_png(fig, path)
