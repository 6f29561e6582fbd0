"""TAPS's part of the report: how many layers each task made its own, and the layer map (the
TAPS paper's Figure 3: which layers each task made task-specific)."""
from __future__ import annotations

from pathlib import Path

from pipeline.core.plotting import pyplot, save_png
from pipeline.methods.base import ReportSection


def layer_report(method, label: str, entry: dict, plot_dir: Path) -> ReportSection:
    facts = method.facts(entry)
    line = "Task-specific layers per task: " + ", ".join(f"{t}: {sum(f.gated_on)}/{len(f.gated_on)}"
                                                          for t, f in facts.items())
    rel = f"layer_map_{label}.png"
    plot_layer_map(label, {t: f.gated_on for t, f in facts.items()}, next(iter(facts.values())).layers,
                   plot_dir / rel)
    return ReportSection(["", line], {f"{label}: task-specific layers": rel})


def plot_layer_map(label: str, gated_on: dict[str, list[bool]], layers: list[str], path: Path) -> None:
    import numpy as np

    plt = pyplot()
    tasks = list(gated_on)
    grid = np.array([[1.0 if g else 0.0 for g in gated_on[t]] for t in tasks])
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.12), 1 + 0.45 * len(tasks)))
    ax.imshow(grid, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_xlabel(f"adapted layer (input -> output), {len(layers)} in all; green = task-specific")
    ax.set_title(f"{label}: task-specific layers per task")
    fig.tight_layout()
    save_png(fig, path)
