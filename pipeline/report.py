"""results.json (schema ``taskfold-results/1``, see README) and report.md with plots."""
from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import TYPE_CHECKING

from pipeline.deploy_report import plot_storage_vs_latency
from pipeline.deploy_report import section as deploy_section
from pipeline.io import atomic_path, read_json, write_json
from pipeline.plotting import pyplot, save_png
from pipeline.policy_report import correlation, is_policy, plot_policy, skip_table
from pipeline.sharing_report import passes_table, plot_relation, relation
from pipeline.sharing_report import table as relation_table

if TYPE_CHECKING:
    from pipeline.run import Runner

SCHEMA = "taskfold-results/1"
DEPLOY_PLOT = "Deployment: storage against latency"


def collect(r: "Runner") -> dict:
    """Gather every stage's records into one results document."""
    from pipeline.run import JOINT_UNIT

    c = r.cfg
    prepare = r.record("prepare") or {}
    fold = r.record("fold") or {}
    export = r.record("export") or {}
    bench = r.record("bench") or {}
    latency = bench.get("latency", {})
    flops = export.get("flops", {})
    methods = {}
    for m in c.methods:
        ledger = fold.get("ledgers", {}).get(m.label, {})
        tasks = {}
        for t in c.tasks:
            res = read_json(r.out / "train" / m.label / t.name / "result.json")
            key = f"{m.label}/{t.name}"
            store = ledger.get("tasks", {}).get(t.name, {})
            tasks[t.name] = {
                "val_acc": res["val_acc"], "test_acc": res["test_acc"],
                "train_seconds": res["train_seconds"], "step_ms": res["step_ms"],
                "fold_check": res["fold_check"],
                "onnx": export.get("parity", {}).get(key),
                "latency": {b: v[key] for b, v in latency.items() if key in v},
                "storage": {k: store.get(k) for k in ("params", "bits", "bytes_on_disk", "fraction_of_base")},
                "describe": res["describe"],
                "flops": flops.get(key),
                "flops_ratio": flops[key] / flops["base"] if key in flops and flops.get("base") else None,
            }
            if "passes" in res:  # multi-pass methods: every pass's accuracy and size, and the one kept
                tasks[t.name] |= {"passes": res["passes"], "kept": res["kept"]}
        ratios = [v["ratio_to_base"] for t in tasks.values() for v in t["latency"].values()]
        flops_ratios = [t["flops_ratio"] for t in tasks.values() if t["flops_ratio"] is not None]
        methods[m.label] = {
            "method": m.name,
            "setting": setting(m),
            "params": m.params.model_dump(mode="json"),
            "tasks": tasks,
            "mean_test_acc": mean(t["test_acc"] for t in tasks.values()),
            "n_x_base": ledger.get("total", {}).get("n_x_base"),
            "bundle_bytes": ledger.get("total", {}).get("bytes_on_disk"),
            "mean_latency_ratio": mean(ratios) if ratios else None,
            "mean_flops_ratio": mean(flops_ratios) if flops_ratios else None,
        }
        if rel := relation(methods[m.label]):
            methods[m.label]["relation"] = rel
        if is_policy(methods[m.label]) and (corr := correlation(methods[m.label])):
            methods[m.label]["policy_correlation"] = {"tasks": corr[0], "cosine": corr[1]}
        joint = r.out / "train" / m.label / JOINT_UNIT / "result.json"
        if joint.is_file():
            methods[m.label]["joint"] = {k: v for k, v in read_json(joint).items() if k != "hash"}
    return {
        "schema": SCHEMA,
        "config": c.to_jsonable(),
        "tasks": prepare.get("tasks", {}),
        "base": {"ledger": next(iter(fold.get("ledgers", {}).values()), {}).get("base"),
                 "latency": {b: v["base"] for b, v in latency.items() if "base" in v},
                 "latency_repeat": {b: v["base_repeat"] for b, v in latency.items() if "base_repeat" in v}},
        "methods": methods,
        "deployment": deployment(r.out, bench.get("deploy"), export.get("form_checks", {})),
        "stage_seconds": r.timings,
    }


def setting(m) -> str:
    """How an entry was trained: all tasks at once, one by one, or one by one from a joint base."""
    from pipeline.methods import REGISTRY

    if REGISTRY[m.name].joint:
        return "joint"
    return f"incremental from {m.base}" if m.base else "incremental"


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


def deployment(out: Path, deploy: dict | None, checks: dict) -> dict:
    """The bench stage's measurements of every form on this machine, plus any ``taskfold bench``
    results saved in ``bench/`` (another device: a GPU machine, an edge board)."""
    devices = {"this run (bench stage)": deploy} if deploy else {}
    for p in sorted((Path(out) / "bench").glob("*.json")):
        devices[p.stem] = read_json(p)
    return {"devices": devices, "checks": checks}


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


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def markdown(res: dict, plots: dict[str, str]) -> str:
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
        layers = [t["describe"] for t in m["tasks"].values() if "gated_on" in t["describe"]]
        if layers:
            on = [sum(d["gated_on"]) for d in layers]
            lines += ["", "Task-specific layers per task: " + ", ".join(f"{n}: {k}/{len(d['gated_on'])}"
                                                                      for n, k, d in zip(m["tasks"], on, layers))]
        if "relation" in m:
            lines += ["", "Where each task's channels come from (% of its shared-layer channels; a borrowed row counts "
                          "for the task that trained it):", ""] + relation_table(m["relation"])
        if is_policy(m):
            joint = m.get("joint", {})
            kept = joint.get("kept_candidate")
            tried = ", ".join(f"#{x['candidate']}: {x['mean_val_acc']:.4f}" for x in joint.get("candidates", []))
            lines += ["", f"Blocks each task skips (architecture #{kept} kept of those retrained, mean val acc "
                          f"{tried}); FLOPs and latency of the merged model against the full base:", ""] + skip_table(m)
        if passes := passes_table(m):
            lines += ["", "Passes over the tasks (multi-task mode): test accuracy / stored params per pass; "
                          "kept = best validation.", ""] + passes
    for sweep in sweeps(res):
        lines += ["", f"## Sweep: {sweep['method']} over {sweep['param']}", ""] + _sweep_table(res, sweep)
    lines += deploy_section(res["deployment"], plots.pop(DEPLOY_PLOT, None))
    for title, rel in plots.items():
        lines += ["", f"## {title}", "", f"![{title}]({rel})"]
    lines += ["", f"Stage wall times (s): {res['stage_seconds']}", ""]
    return "\n".join(lines)


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


def plot_layer_map(label: str, m: dict, path: Path) -> None:
    """TAPS paper Figure 3: which layers each task made task-specific."""
    import numpy as np

    plt = pyplot()

    tasks = list(m["tasks"])
    grid = np.array([[1.0 if g else 0.0 for g in m["tasks"][t]["describe"]["gated_on"]] for t in tasks])
    layers = m["tasks"][tasks[0]]["describe"]["layers"]
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.12), 1 + 0.45 * len(tasks)))
    ax.imshow(grid, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_xlabel(f"adapted layer (input -> output), {len(layers)} in all; green = task-specific")
    ax.set_title(f"{label}: task-specific layers per task")
    fig.tight_layout()
    save_png(fig, path)


def write_report(r: "Runner") -> dict:
    res = collect(r)
    plots = {}
    plot_accuracy_vs_params(res, r.out / "plots" / "accuracy_vs_params.png")
    plots["Accuracy against parameters"] = "plots/accuracy_vs_params.png"
    for sweep in sweeps(res):
        rel = f"plots/sweep_{sweep['method']}_{sweep['param']}.png"
        plot_sweep(res, sweep, r.out / rel)
        plots[f"{sweep['method']}: accuracy against {sweep['param']}"] = rel
    for label, m in res["methods"].items():
        if all("gated_on" in t["describe"] for t in m["tasks"].values()):
            rel = f"plots/layer_map_{label}.png"
            plot_layer_map(label, m, r.out / rel)
            plots[f"{label}: task-specific layers"] = rel
        if is_policy(m):
            rel = f"plots/policy_{label}.png"
            plot_policy(label, m, r.out / rel)
            plots[f"{label}: learned policy and task correlation"] = rel
        if "relation" in m:
            rel = f"plots/task_relation_{label}.png"
            plot_relation(label, m["relation"], r.out / rel)
            plots[f"{label}: where each task's channels come from"] = rel
    devices = res["deployment"]["devices"]
    if devices:
        rel = "plots/deployment_storage_vs_latency.png"
        plot_storage_vs_latency(next(iter(devices.values())), r.out / rel)
        plots[DEPLOY_PLOT] = rel
    write_json(r.out / "results.json", res)
    with atomic_path(r.out / "report.md") as tmp:
        tmp.write_text(markdown(res, plots))
    return {"results": "results.json", "report": "report.md", "plots": list(plots.values())}
