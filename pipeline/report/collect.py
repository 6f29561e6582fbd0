"""results.json (schema ``taskfold-results/1``, see README): every stage's records of a run
directory gathered into one document, each method entry extended by its method's summary."""
from __future__ import annotations

from pathlib import Path
from statistics import mean

from pipeline.core.io import read_json
from pipeline.methods import REGISTRY
from pipeline.stages.rundir import RunDir

SCHEMA = "taskfold-results/1"


def setting(m) -> str:
    """How an entry was trained: all tasks at once, one by one, or one by one from a joint base."""
    if REGISTRY[m.name].trainer == "joint":
        return "joint"
    return f"incremental from {m.base}" if m.base else "incremental"


def collect(cfg, run: RunDir, timings: dict) -> dict:
    prepare = run.record("prepare") or {}
    fold = run.record("fold") or {}
    export = run.record("export") or {}
    bench = run.record("bench") or {}
    latency = bench.get("latency", {})
    flops = export.get("flops", {})
    methods = {}
    for m in cfg.methods:
        ledger = fold.get("ledgers", {}).get(m.label, {})
        tasks = {}
        for t in cfg.tasks:
            res = run.read_result(m.label, t.name)
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
        entry = {
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
        entry |= REGISTRY[m.name].summarise(entry)
        if (joint := run.joint_result(m.label)) is not None:
            entry["joint"] = {k: v for k, v in joint.items() if k != "hash"}
        methods[m.label] = entry
    return {
        "schema": SCHEMA,
        "config": cfg.to_jsonable(),
        "tasks": prepare.get("tasks", {}),
        "base": {"ledger": next(iter(fold.get("ledgers", {}).values()), {}).get("base"),
                 "latency": {b: v["base"] for b, v in latency.items() if "base" in v},
                 "latency_repeat": {b: v["base_repeat"] for b, v in latency.items() if "base_repeat" in v}},
        "methods": methods,
        "deployment": deployment(run, bench.get("deploy"), export.get("form_checks", {})),
        "stage_seconds": timings,
        "export_seconds": export.get("seconds", {}),  # per form: build (ONNX export, tracing) and check
    }


def deployment(run: RunDir, deploy: dict | None, checks: dict) -> dict:
    """The bench stage's measurements of every form on this machine, plus any ``taskfold bench``
    results saved in ``bench/`` (another device: a GPU machine, an edge board)."""
    devices = {"this run (bench stage)": deploy} if deploy else {}
    for p in sorted(Path(run.bench_dir).glob("*.json")):
        devices[p.stem] = read_json(p)
    return {"devices": devices, "checks": checks}
