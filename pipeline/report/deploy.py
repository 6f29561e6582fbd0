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
PRIORITIES = ("storage", "latency", "memory")


def _latency(row: dict) -> float:
    """A form's latency against merged, the mean over the measured batch sizes."""
    ratios = [v["ratio_to_merged"] for v in row["latency"].values()]
    return sum(ratios) / len(ratios) if ratios else float("inf")


def worse_than_merged(row: dict) -> bool:
    """More bytes than K merged models and slower than merged at every batch size: a form that
    pays on both axes (it may still save resident memory, which the table shows)."""
    lat = [v["ratio_to_merged"] for v in row["latency"].values()]
    return (row.get("bytes_vs_merged") or 0) > 1 and bool(lat) and all(r > 1 for r in lat)


def rank_forms(rows: dict[str, dict], prefer: str) -> list[str]:
    """One method's forms, best first for ``prefer`` (storage: bytes on disk; latency: mean
    ratio to merged; memory: resident MB for K tasks), ties broken by the other two in order."""
    if prefer not in PRIORITIES:
        raise ValueError(f"prefer {prefer!r}: one of {', '.join(PRIORITIES)}")
    key = {"storage": lambda r: r["bytes"], "latency": _latency,
           "memory": lambda r: r["resident_mb"] if r.get("resident_mb") is not None else float("inf")}
    order = [prefer] + [p for p in PRIORITIES if p != prefer]
    return sorted(rows, key=lambda f: tuple(key[p](rows[f]) for p in order))


def ranking_lines(deploy: dict, prefer: str) -> list[str]:
    """Per method: its forms ranked for ``prefer``, forms worse than merged on bytes and latency
    marked so."""
    lines = []
    for label, rows in deploy["methods"].items():
        ranked = [f + (" (worse than merged on bytes and latency)" if worse_than_merged(rows[f]) else "")
                  for f in rank_forms(rows, prefer)]
        lines.append(f"- {label}, by {prefer}: " + " > ".join(ranked))
    return lines


def forms_table(deploy: dict) -> list[str]:
    batches = list(deploy["base"])
    head = ("| method | form | bytes (K tasks) | x merged | resident MB | x merged | x stored | switch ms | "
            + " | ".join(f"{b} ms | x base | x merged" for b in batches) + " | verdict |")
    lines = [head, "|---|---|" + "---|" * (7 + 3 * len(batches))]
    for label, rows in deploy["methods"].items():
        for form, r in rows.items():
            lat = " | ".join(f"{_f(r['latency'][b]['median_ms'], '.2f')} | {_f(r['latency'][b]['ratio_to_base'], '.3f')}"
                             f" | {_f(r['latency'][b]['ratio_to_merged'], '.3f')}" for b in batches)
            lines.append(f"| {label} | {form} | {_f(r['bytes'], ',')} | {_f(r.get('bytes_vs_merged'), '.3f')} | "
                         f"{_f(r.get('resident_mb'), '.1f')} | {_f(r.get('resident_vs_merged'), '.3f')} | "
                         f"{_f(r.get('resident_vs_stored'), '.2f')} | "
                         f"{_f(r['switch_ms'], '.1f')} | {lat} | {_verdict(form, r)} |")
    return lines


def _verdict(form: str, row: dict) -> str:
    if form == "merged":
        return "reference"
    if worse_than_merged(row):
        return "**worse than merged on bytes and latency**" + (
            ", less memory" if (row.get("resident_vs_merged") or 2) < 1 else "")
    gains = [what for what, ratio in (("bytes", row.get("bytes_vs_merged")), ("memory", row.get("resident_vs_merged")))
             if ratio is not None and ratio < 1]
    if all(v["ratio_to_merged"] <= 1 for v in row["latency"].values()):
        gains.append("latency")
    return "saves " + ", ".join(gains) if gains else "no saving"


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
              "plain models) and the base model, measured in one run. Resident memory leaves out library "
              "code (shared by every process; `library_code_mb` in results.json); x stored is against the "
              "fewest bytes any exact form stores for the K tasks (the base once and the tasks' own "
              "tensors). Switch: a task brought up from its files to its first answer (batch 1), timed in "
              "a process that runs only that form where memory is measured (`switch_process: own` in "
              "results.json), else in the bench's process beside every other target (`bench`).", ""]
    for device, deploy in devices.items():
        lines += [f"### {device} ({', '.join(deploy['providers'])})", ""] + forms_table(deploy) + [""]
        lines += ["Forms per method, best first (`taskfold bench --prefer storage|latency|memory`):", ""]
        lines += [ln for p in PRIORITIES for ln in ranking_lines(deploy, p)] + [""]
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
