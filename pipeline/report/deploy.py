"""The report's deployment section: every artefact form's bytes, memory, latency and task-switch
time for K tasks (from ``exporters.bench``), the edge variants' accuracy, and a plot of storage
against latency per form. Also used by ``taskfold bench`` to print what it measured."""
from __future__ import annotations

from pathlib import Path

from exporters.forms import FORMS
from pipeline.core.plotting import pyplot, save_png
from pipeline.core.text import fmt as _f
from pipeline.core.text import md_table

FORM_NOTES = {name: form.note for name, form in FORMS.items()}


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
    """Accuracy of the lossy forms (fp16, int8, ...) against the float32 merged model."""
    lossy = [name for name, form in FORMS.items() if form.lossy]
    rows: dict[tuple[str, str], dict] = {}
    for key, c in checks.items():
        label, task, form = key.split("/")
        if form in lossy:
            rows.setdefault((label, task), {})[form] = c
    present = [f for f in lossy if any(f in r for r in rows.values())]
    if not rows:
        return []
    out = []
    for (label, task), r in rows.items():
        ref = next(iter(r.values()))["reference_accuracy"]
        cells = [label, task, f"{ref:.4f}"]
        for f in present:
            c = r.get(f, {})
            cells += [_f(c.get("accuracy"), ".4f"), _f(c.get("argmax_agree"), ".4f"), _f(c.get("max_abs_diff"), ".3f")]
        out.append(cells)
    header = ["method", "task", "fp32 acc"] + [h for f in present for h in (f"{f} acc", f"{f} argmax agree",
                                                                              f"{f} max diff")]
    return md_table(header, out)


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
