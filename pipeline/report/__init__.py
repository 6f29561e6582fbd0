"""The report: results.json and report.md with plots, read from a run directory."""
from __future__ import annotations

from pipeline.core.io import atomic_path, write_json
from pipeline.methods import REGISTRY
from pipeline.report.collect import SCHEMA, collect
from pipeline.report.deploy import plot_storage_vs_latency
from pipeline.report.markdown import markdown, sweeps
from pipeline.report.plots import plot_accuracy_vs_params, plot_sweep
from pipeline.stages.rundir import RunDir


def write_report(cfg, run: RunDir, timings: dict) -> dict:
    """Write results.json, report.md and the plots of a run; returns what was written."""
    res = collect(cfg, run, timings)
    plots = {"Accuracy against parameters": "accuracy_vs_params.png"}
    plot_accuracy_vs_params(res, run.plots / plots["Accuracy against parameters"])
    for sweep in sweeps(res):
        name = f"sweep_{sweep['method']}_{sweep['param']}.png"
        plot_sweep(res, sweep, run.plots / name)
        plots[f"{sweep['method']}: accuracy against {sweep['param']}"] = name
    sections = {}
    for label, entry in res["methods"].items():
        sections[label] = REGISTRY[entry["method"]].report(label, entry, run.plots)
        plots |= sections[label].plots
    from pipeline.planner import plans_section

    plan_lines, plan_plots = plans_section(run, run.plots)
    plots |= plan_plots
    deploy_plot = None
    if devices := res["deployment"]["devices"]:
        deploy_plot = "deployment_storage_vs_latency.png"
        plot_storage_vs_latency(next(iter(devices.values())), run.plots / deploy_plot)
    rel = {title: f"{run.rel(run.plots)}/{name}" for title, name in plots.items()}
    write_json(run.results_file, res)
    with atomic_path(run.report_file) as tmp:
        tmp.write_text(markdown(res, sections, rel, f"{run.rel(run.plots)}/{deploy_plot}" if deploy_plot else None,
                                plan_lines))
    return {"results": run.rel(run.results_file), "report": run.rel(run.report_file),
            "plots": list(rel.values()) + ([f"{run.rel(run.plots)}/{deploy_plot}"] if deploy_plot else [])}


__all__ = ["SCHEMA", "collect", "write_report"]
