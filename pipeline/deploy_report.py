"""The report's deployment section: every artefact form's bytes, memory, latency and task-switch
time for K tasks (from ``exporters.bench``), the edge variants' accuracy, and a plot of storage
against latency per form. Also used by ``taskfold bench`` to print what it measured."""
from __future__ import annotations

from pathlib import Path

from pipeline.plotting import pyplot, save_png

FORM_NOTES = {
    "merged": "one plain model file per task",
    "shared": "per-task graphs; base weights in one shared file, shared in memory",
    "switch": "one session; the task is an onnxruntime adapter file",
    "branch": "shared form with low-rank deltas as side branches on the base layers",
    "branch_switch": "switch form of the branch graphs",
    "fp16": "merged, float16 weights and compute",
    "int8": "merged, static INT8 (QDQ), calibrated on task images",
}


def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def forms_table(deploy: dict) -> list[str]:
    batches = list(deploy["base"])
    head = ("| method | form | bytes (K tasks) | x merged | resident MB | x merged | switch ms | "
            + " | ".join(f"{b} ms | x base | x merged" for b in batches) + " |")
    lines = [head, "|---|---|" + "---|" * (5 + 3 * len(batches))]
    for label, rows in deploy["methods"].items():
        for form, r in rows.items():
            lat = " | ".join(f"{_f(r['latency'][b]['median_ms'], '.2f')} | {_f(r['latency'][b]['ratio_to_base'], '.3f')}"
                             f" | {_f(r['latency'][b]['ratio_to_merged'], '.3f')}" for b in batches)
            lines.append(f"| {label} | {form} | {_f(r['bytes'], ',')} | {_f(r.get('bytes_vs_merged'), '.3f')} | "
                         f"{_f(r.get('resident_mb'), '.1f')} | {_f(r.get('resident_vs_merged'), '.3f')} | "
                         f"{_f(r['switch_ms'], '.1f')} | {lat} |")
    return lines


def edge_table(checks: dict) -> list[str]:
    rows: dict[tuple[str, str], dict] = {}
    for key, c in checks.items():
        label, task, form = key.split("/")
        if form in ("fp16", "int8"):
            rows.setdefault((label, task), {})[form] = c
    if not rows:
        return []
    lines = ["| method | task | fp32 acc | fp16 acc | fp16 argmax agree | int8 acc | int8 argmax agree | int8 max diff |",
             "|---|---|---|---|---|---|---|---|"]
    for (label, task), r in rows.items():
        ref = next(iter(r.values()))["reference_accuracy"]
        fp16, int8 = r.get("fp16", {}), r.get("int8", {})
        lines.append(f"| {label} | {task} | {ref:.4f} | {_f(fp16.get('accuracy'), '.4f')} | "
                     f"{_f(fp16.get('argmax_agree'), '.4f')} | {_f(int8.get('accuracy'), '.4f')} | "
                     f"{_f(int8.get('argmax_agree'), '.4f')} | {_f(int8.get('max_abs_diff'), '.3f')} |")
    return lines


def section(deployment: dict, plot: str | None) -> list[str]:
    lines = ["", "## Deployment", ""]
    devices = deployment.get("devices", {})
    if not devices:
        return lines + ["No deployment forms were measured (export.forms or bench.forms is off)."]
    lines += ["Forms: " + "; ".join(f"**{k}**: {v}" for k, v in FORM_NOTES.items()) + ".", "",
              "Bytes and resident memory are for all K tasks; ratios are against the merged form (K "
              "plain models) and the base model, measured in one run. Switch: a task brought up from its "
              "files to its first answer (batch 1).", ""]
    for device, deploy in devices.items():
        lines += [f"### {device} ({', '.join(deploy['providers'])})", ""] + forms_table(deploy) + [""]
    edge = edge_table(deployment.get("checks", {}))
    if edge:
        lines += ["### Edge variants: accuracy against FP32 (onnxruntime, test split)", ""] + edge + [""]
    if plot:
        lines += [f"![storage against latency]({plot})", ""]
    return lines


def plot_storage_vs_latency(deploy: dict, path: Path, batch: str | None = None) -> None:
    """Bytes on disk for K tasks (log) against latency / base, one marker per (method, form)."""
    plt = pyplot()

    batch = batch or next(iter(deploy["base"]))
    markers = dict(zip(FORM_NOTES, "os^vDPX"))
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for i, (label, rows) in enumerate(deploy["methods"].items()):
        color = f"C{i % 10}"
        for form, r in rows.items():
            ax.scatter(r["bytes"], r["latency"][batch]["ratio_to_base"], color=color, marker=markers.get(form, "o"),
                       s=55, alpha=0.85, label=label if form == "merged" else None)
    for form, m in markers.items():
        ax.scatter([], [], color="grey", marker=m, label=form)
    ax.set_xscale("log")
    ax.set_xlabel("bytes on disk for all tasks (log)")
    ax.set_ylabel(f"latency / base ({batch})")
    ax.set_title("Deployment forms: storage against latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_png(fig, path)
