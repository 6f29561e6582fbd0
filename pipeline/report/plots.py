"""The report's general plots: accuracy against stored parameters, and accuracy along a sweep."""
from __future__ import annotations

from pathlib import Path

from pipeline.core.plotting import pyplot, save_png


def plot_accuracy_vs_params(res: dict, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, m in res["methods"].items():
        if m["n_x_base"] is None:
            continue
        ax.scatter([m["n_x_base"]], [m["mean_test_acc"]], s=60, label=label, zorder=3, alpha=0.85)
    ax.set_xlabel("stored parameters, N x base (all tasks)")
    ax.set_ylabel("mean test accuracy")
    ax.set_title("Accuracy against parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def plot_sweep(res: dict, sweep: dict, path: Path) -> None:
    """Accuracy per task against the swept parameter (FTN paper: accuracy against rank),
    with the stored parameters (N x base) on a second axis."""
    plt = pyplot()

    xs, labels = sweep["values"], sweep["labels"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for t in res["tasks"]:
        ax.plot(xs, [res["methods"][lb]["tasks"][t]["test_acc"] for lb in labels], marker="o", alpha=0.7, label=t)
    ax.plot(xs, [res["methods"][lb]["mean_test_acc"] for lb in labels], marker="s", color="black", lw=2, label="mean")
    if min(xs) > 0 and max(xs) / min(xs) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel(sweep["param"])
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    n_x = [res["methods"][lb]["n_x_base"] for lb in labels]
    if None not in n_x:
        ax2 = ax.twinx()
        ax2.plot(xs, n_x, ls="--", color="grey", marker="x", label="N x base")
        ax2.set_ylabel("N x base (dashed)")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{sweep['method']}: accuracy against {sweep['param']}")
    fig.tight_layout()
    save_png(fig, path)
