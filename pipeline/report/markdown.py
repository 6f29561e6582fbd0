"""report.md: the run's tables in markdown, each method's own section after its table."""
from __future__ import annotations

import json
from statistics import mean

from pipeline.core.text import fmt as _fmt
from pipeline.core.text import md_table
from pipeline.report.deploy import section as deploy_section


def joint_table(res: dict) -> list[str]:
    """Joint and incremental entries side by side (the TAPS paper's Table 5)."""
    tasks = list(res["tasks"])
    order = sorted(res["methods"], key=lambda lb: (res["methods"][lb]["setting"] != "joint",
                                                   res["methods"][lb]["setting"] == "incremental"))
    lines = ["| method | setting | " + " | ".join(tasks) + " | mean | N x base | FLOPs x base |",
             "|---|---|" + "---|" * (len(tasks) + 3)]
    for label in order:
        m = res["methods"][label]
        lines.append(f"| {label} | {m['setting']} | " + " | ".join(f"{m['tasks'][t]['test_acc']:.4f}" for t in tasks)
                     + f" | {m['mean_test_acc']:.4f} | {_fmt(m['n_x_base'], '.3f')} | "
                       f"{_fmt(m['mean_flops_ratio'], '.3f')} |")
    return lines


def baseline_table(res: dict, baseline: str = "lora") -> list[str]:
    """Every entry against the baseline users already know (LoRA), on both axes: dominated (a
    baseline entry stores no more and is at least as accurate), dominating (one stores no less
    and is no more accurate), or a different trade-off. Every verdict names the entry it rests on."""
    refs = {lb: m for lb, m in res["methods"].items() if m["method"] == baseline and m["n_x_base"] is not None}
    if not refs:
        return []
    rows = []
    for label, m in res["methods"].items():
        if m["method"] == baseline or m["n_x_base"] is None:
            continue
        n, acc = m["n_x_base"], m["mean_test_acc"]
        cheaper = [(lb, r) for lb, r in refs.items() if r["n_x_base"] <= n + 1e-9 and r["mean_test_acc"] >= acc]
        costlier = [(lb, r) for lb, r in refs.items() if r["n_x_base"] >= n - 1e-9 and r["mean_test_acc"] <= acc]
        if cheaper:
            lb, r = max(cheaper, key=lambda x: x[1]["mean_test_acc"])
            verdict = "**below**: LoRA is as accurate or more with no more storage"
        elif costlier:
            lb, r = min(costlier, key=lambda x: x[1]["n_x_base"])
            verdict = "above: as accurate or more with no more storage than LoRA"
        else:
            lb, r = min(refs.items(), key=lambda x: abs(x[1]["n_x_base"] - n))
            verdict = ("another trade-off: less storage, less accuracy" if n < r["n_x_base"]
                       else "another trade-off: more storage, more accuracy")
        rows.append([label, f"{n:.3f}", f"{acc:.4f}", f"{lb}: {r['mean_test_acc']:.4f} at {r['n_x_base']:.3f}x",
                     verdict])
    return md_table(["entry", "N x base", "mean test acc", "LoRA entry compared", "verdict"], rows)


def sweeps(res: dict) -> list[dict]:
    """Runs of one method that differ in exactly one numeric parameter (3 or more): a sweep,
    e.g. FTN over rank or TAPS over lambda. Sorted by the parameter's value."""
    out = []
    by_method: dict[str, list[str]] = {}
    for label, m in res["methods"].items():
        by_method.setdefault(m["method"], []).append(label)
    for name, labels in by_method.items():
        params = [res["methods"][label]["params"] for label in labels]
        keys = sorted({k for p in params for k in p})
        varying = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in params}) > 1]
        if len(labels) < 3 or len(varying) != 1:
            continue
        key = varying[0]
        if not all(isinstance(p.get(key), (int, float)) and not isinstance(p.get(key), bool) for p in params):
            continue
        points = sorted(zip((p[key] for p in params), labels))
        out.append({"method": name, "param": key, "values": [v for v, _ in points], "labels": [lb for _, lb in points]})
    return out


def _sweep_table(res: dict, sweep: dict) -> list[str]:
    tasks = list(res["tasks"])
    lines = [f"| {sweep['param']} | " + " | ".join(tasks) + " | mean | N x base | task bytes (mean) |",
             "|---|" + "---|" * (len(tasks) + 3)]
    for value, label in zip(sweep["values"], sweep["labels"]):
        m = res["methods"][label]
        accs = [m["tasks"][t]["test_acc"] for t in tasks]
        sizes = [m["tasks"][t]["storage"]["bytes_on_disk"] for t in tasks]
        size = _fmt(mean(sizes) if None not in sizes else None, ",.0f")
        lines.append(f"| {value} | " + " | ".join(f"{a:.4f}" for a in accs) +
                     f" | {mean(accs):.4f} | {_fmt(m['n_x_base'], '.3f')} | {size} |")
    return lines


def passes_table(method: dict) -> list[str]:
    """Test accuracy / stored params of every pass per task, and the version kept (entries whose
    tasks were trained over several passes; empty otherwise)."""
    tasks = method["tasks"]
    if not all("passes" in t for t in tasks.values()):
        return []
    n = len(next(iter(tasks.values()))["passes"])
    rows = [[name, *(f"{p['test_acc']:.4f} / {p['params']:,}" for p in t["passes"]), t["kept"]]
            for name, t in tasks.items()]
    return md_table(["task", *(f"pass {p}" for p in range(1, n + 1)), "kept"], rows)


def markdown(res: dict, sections: dict, plots: dict[str, str], deploy_plot: str | None,
             extra: list[str] = ()) -> str:
    """``sections``: label -> the method's own ``ReportSection``; ``plots``: title -> path, shown at
    the end; ``deploy_plot``: the deployment section's plot."""
    tasks = list(res["tasks"])
    lines = ["# taskfold report", ""]
    cfg = res["config"]
    lines += [f"Backbone `{cfg['backbone']['name']}` (weights: {cfg['backbone']['weights']}), "
              f"{cfg['backbone']['image_size']} px; {len(tasks)} tasks; threads {cfg['run']['threads']}.", ""]
    lines += ["## Tasks", "", "| task | source | domain | classes | train | val | test |", "|---|---|---|---|---|---|---|"]
    for name, t in res["tasks"].items():
        lines.append(f"| {name} | {t['source']} | {t['domain']} | {t['num_classes']} | {t['train']} | {t['val']} | {t['test']} |")
    lines += ["", "## Summary", "",
              "| method | mean test acc | N x base | bundle bytes | merged/base latency (mean) | FLOPs x base (mean) |",
              "|---|---|---|---|---|---|"]
    for label, m in res["methods"].items():
        lines.append(f"| {label} | {m['mean_test_acc']:.4f} | {_fmt(m['n_x_base'], '.3f')} | "
                     f"{_fmt(m['bundle_bytes'], ',')} | {_fmt(m['mean_latency_ratio'], '.3f')} | "
                     f"{_fmt(m['mean_flops_ratio'], '.3f')} |")
    if any(m["setting"] != "incremental" for m in res["methods"].values()):
        lines += ["", "## Joint and incremental", "",
                  "Joint entries train every task at once (shared weights, per-task norms and heads); their "
                  "N x base counts the jointly trained shared weights once. \"incremental from X\" starts each "
                  "task from joint entry X's shared weights.", ""] + joint_table(res)
    if table := baseline_table(res):
        lines += ["", "## Against the LoRA baseline", "",
                  "Each entry against the LoRA entries (the same data, ledger and recipe machinery), on accuracy "
                  "and storage together: a compact method earns its place when no LoRA entry is as accurate "
                  "with no more storage.", ""] + table
    base = res["base"]
    if base.get("ledger"):
        lines += ["", f"Base: {base['ledger']['params']:,} params, {base['ledger']['bytes_on_disk']:,} bytes on disk."]
    for b, v in base.get("latency", {}).items():
        floor = base.get("latency_repeat", {}).get(b, {}).get("ratio_to_base")
        lines.append(f"Base latency ({b}): median {v['median_ms']:.2f} ms, p90 {v['p90_ms']:.2f} ms; "
                     f"a second base session measured {_fmt(floor, '.3f')} x (the bench's noise floor).")
    for label, m in res["methods"].items():
        lines += ["", f"## {label}", "",
                  "| task | test acc | val acc | task params | x base | bits | bytes on disk | fold max diff | "
                  "ONNX max diff | ONNX argmax agree | latency b1 ms | ratio b1 | step ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, t in m["tasks"].items():
            s, o = t["storage"], t["onnx"] or {}
            lat = next(iter(t["latency"].values()), {})
            lines.append(
                f"| {name} | {t['test_acc']:.4f} | {t['val_acc']:.4f} | {_fmt(s['params'], ',')} | "
                f"{_fmt(s['fraction_of_base'], '.4f')} | {_fmt(s['bits'], ',')} | {_fmt(s['bytes_on_disk'], ',')} | "
                f"{t['fold_check']['max_abs_diff']:.1e} | {_fmt(o.get('max_abs_diff'), '.1e')} | "
                f"{_fmt(o.get('argmax_agree'), '.4f')} | {_fmt(lat.get('median_ms'), '.2f')} | "
                f"{_fmt(lat.get('ratio_to_base'), '.3f')} | {t['step_ms']:.1f} |")
        lines += sections[label].lines
        if passes := passes_table(m):
            lines += ["", "Passes over the tasks (multi-task mode): test accuracy / stored params per pass; "
                          "kept = best validation.", ""] + passes
    for sweep in sweeps(res):
        lines += ["", f"## Sweep: {sweep['method']} over {sweep['param']}", ""] + _sweep_table(res, sweep)
    lines += list(extra)
    lines += deploy_section(res["deployment"], deploy_plot)
    for title, rel in plots.items():
        lines += ["", f"## {title}", "", f"![{title}]({rel})"]
    lines += ["", f"Stage wall times (s): {res['stage_seconds']}", ""]
    if per_form := res.get("export_seconds"):
        lines += ["Export seconds per form (build + check): "
                  + ", ".join(f"{k} {v['build']:.1f} + {v['check']:.1f}" for k, v in per_form.items()), ""]
    if bench := res["deployment"]["devices"].get("this run (bench stage)", {}).get("seconds"):
        lines += ["Bench seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in bench.items()), ""]
    return "\n".join(lines)


