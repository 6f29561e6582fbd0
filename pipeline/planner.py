"""``taskfold plan RUN_DIR --budget 1.2x``: the best set of task parts a storage budget buys.

Given every entry a run trained (a sweep of lam, ranks, methods), pick for each task the entry
with the best estimated accuracy such that the whole set fits the budget (N x base, as the
ledger counts it: the base once while any chosen task still uses it, plus every chosen task's
stored values), optionally with every chosen merged model within a latency ratio to the base.
The estimate is the validation accuracy shrunk toward the entry's strength on the other tasks
(``pipeline.shrinkage``: a lead on a small validation split is mostly luck), or as measured with
``--estimate raw``. Tasks from different methods share the base (the delta vocabulary allows
it), so the choice is written as a bundle of its own that loads, merges and exports like any
other.

The search is exact: every combination is scored (a multiple-choice knapsack whose base term
couples the tasks), up to ``MAX_COMBINATIONS``; beyond that, entries dominated on one task (no
more accurate and no smaller than another) are dropped first, which never drops the optimum.
Entries whose tasks borrow rows from other tasks (CWPS) are chosen only together with the
tasks they point to, from the same entry.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.core.bundle import Bundle, backbone_id, load_bundle, write_bundle
from pipeline.core.errors import TaskfoldError
from pipeline.core.io import read_json, write_json
from pipeline.core.text import fmt
from pipeline.methods import REGISTRY
from pipeline.shrinkage import ESTIMATES, shrink

MAX_COMBINATIONS = 2_000_000


class PlanError(TaskfoldError, ValueError):
    """A budget no combination fits, or a run without what a plan needs; says which."""


@dataclass(frozen=True)
class Item:
    """One (entry, task) a plan may choose."""

    label: str
    task: str
    val_acc: float
    test_acc: float
    params: int  # values its file stores
    covers: frozenset[str]  # base tensors it makes unnecessary
    latency: float | None = None  # merged / base, batch 1, where benched
    references: frozenset[str] = frozenset()  # tasks whose rows it borrows (same entry)
    estimate: float | None = None  # the accuracy a choice trusts; None: val_acc

    @property
    def score(self) -> float:
        return self.val_acc if self.estimate is None else self.estimate


@dataclass
class Choice:
    items: dict[str, Item]
    n_x_base: float
    mean_val: float
    mean_test: float
    mean_estimate: float = 0.0
    front: list[dict] = field(default_factory=list)


def n_x_base(items, base_sizes: dict[str, int], base_params: int) -> float:
    covered = frozenset.intersection(*(i.covers for i in items)) if items else frozenset()
    in_use = base_params - sum(base_sizes.get(k, 0) for k in covered)
    return (in_use + sum(i.params for i in items)) / base_params


def _consistent(items) -> bool:
    chosen = {i.task: i.label for i in items}
    return all(chosen.get(t) == i.label for i in items for t in i.references)


def _prune(options: list[Item]) -> list[Item]:
    """Drop an item when another of the same task is at least as accurate and no larger (and
    covers no less of the base): it can never be the better pick."""
    keep = []
    for a in options:
        dominated = any(b is not a and b.score >= a.score and b.params <= a.params and b.covers >= a.covers
                        and not b.references and (b.score, -b.params) != (a.score, -a.params) for b in options)
        if not dominated or a.references:
            keep.append(a)
    return keep


def choose(items: list[Item], tasks: list[str], base_sizes: dict[str, int], base_params: int, budget: float,
           latency: float | None = None) -> Choice:
    """The combination (one item per task) of best mean estimated accuracy within the budget
    (ties: the smaller)."""
    options = {t: [i for i in items if i.task == t and (latency is None or (i.latency is not None and
                                                                            i.latency <= latency))] for t in tasks}
    if missing := [t for t, o in options.items() if not o]:
        raise PlanError(f"no entry of task(s) {missing} meets --latency {latency}x (merged latency from the bench)")
    if math.prod(len(o) for o in options.values()) > MAX_COMBINATIONS:
        options = {t: _prune(o) for t, o in options.items()}
    if (n := math.prod(len(o) for o in options.values())) > MAX_COMBINATIONS:
        raise PlanError(f"{n:,} combinations even after dropping dominated entries; plan over fewer entries")
    best, best_key = None, None
    for combo in itertools.product(*(options[t] for t in tasks)):
        if not _consistent(combo):
            continue
        cost = n_x_base(combo, base_sizes, base_params)
        if cost > budget + 1e-12:
            continue
        key = (sum(i.score for i in combo), -cost)
        if best_key is None or key > best_key:
            best, best_key = combo, key
    if best is None:
        smallest = n_x_base([min(options[t], key=lambda i: i.params) for t in tasks], base_sizes, base_params)
        raise PlanError(f"no combination of the run's entries fits --budget {budget}x (the smallest is about "
                        f"{smallest:.3f}x)")
    return Choice({i.task: i for i in best}, n_x_base(best, base_sizes, base_params),
                  sum(i.val_acc for i in best) / len(best), sum(i.test_acc for i in best) / len(best),
                  sum(i.score for i in best) / len(best))


def best_single(items: list[Item], tasks: list[str], base_sizes: dict[str, int], base_params: int, budget: float,
                latency: float | None = None) -> Choice | None:
    """The one entry, used for every task, that a plan mixing entries has to beat: the best
    mean estimate of those within the budget (None: none fits)."""
    singles = []
    for label in dict.fromkeys(i.label for i in items):
        try:
            singles.append(choose([i for i in items if i.label == label], tasks, base_sizes, base_params, budget,
                                  latency))
        except PlanError:
            continue
    return max(singles, key=lambda c: (c.mean_estimate, -c.n_x_base), default=None)


def items_of(run, cfg) -> tuple[list[Item], dict[str, int], int, dict[str, Bundle]]:
    """Every (entry, task) of a run whose bundle is built on the pretrained base, with the base's
    tensor sizes; joint entries and entries from a joint base have bases of their own."""
    bench = run.record("bench") or {}
    latency = next(iter((bench.get("latency") or {}).values()), {})
    bundles, items, base_sha = {}, [], None
    for m in cfg.methods:
        if REGISTRY[m.name].trainer == "joint" or m.base:
            continue
        b = load_bundle(run.bundle(m.label), expect_backbone=cfg.backbone.name)
        sha = b.manifest["files"]["base.safetensors"]["sha256"]
        if base_sha not in (None, sha):
            raise PlanError(f"{run.bundle(m.label)}: its base differs from the other entries'; plans mix entries of "
                            "one base")
        base_sha = sha
        bundles[m.label] = b
        for task in b.tasks:
            d = b.delta(task)
            res = run.read_result(m.label, task)
            items.append(Item(m.label, task, res["val_acc"], res["test_acc"], d.params(),
                              frozenset(f"{p}.{n}" for p, e in d.entries.items() for n in e.covers()),
                              (latency.get(f"{m.label}/{task}") or {}).get("ratio_to_base"), frozenset(d.references())))
    if not bundles:
        raise PlanError(f"{run.root}: no incremental entry to plan over")
    base = next(iter(bundles.values())).base.state_dict()
    sizes = {k: v.numel() for k, v in base.items() if v.is_floating_point()}
    return items, sizes, sum(sizes.values()), bundles


def estimated(items: list[Item], run, kind: str) -> tuple[list[Item], str]:
    """The items with the accuracy the choice trusts (``kind``: shrunk or raw), and a line that
    says how it was made."""
    if kind not in ESTIMATES:
        raise PlanError(f"--estimate {kind!r}: expected one of {', '.join(ESTIMATES)}")
    if kind == "raw":
        return items, "validation accuracy as measured"
    n_val = {t: int(r.get("val") or 0) for t, r in ((run.record("prepare") or {}).get("tasks") or {}).items()}
    s = shrink({(i.label, i.task): i.val_acc for i in items}, n_val)
    return [replace(i, estimate=s.estimates[i.label, i.task]) for i in items], s.note


def plan(run_dir: Path, budget: float, latency: float | None = None, name: str | None = None,
         log=print, estimate: str = "shrunk") -> dict:
    """Choose, write ``plans/<name>/bundle`` and ``plan.json``, return the plan record."""
    from pipeline.config import parse_config
    from pipeline.data.config import safe_name
    from pipeline.stages.rundir import RunDir

    run = RunDir(Path(run_dir))
    if not run.config_file.is_file():
        raise PlanError(f"{run.config_file}: not found; plan over a finished run directory")
    cfg = parse_config(read_json(run.config_file), str(run.config_file), check_paths=False)
    name = safe_name(name or f"budget-{budget:g}x" + (f"-latency-{latency:g}x" if latency else "")
                     + ("-raw" if estimate == "raw" else ""), "plan name")
    items, sizes, base_params, bundles = items_of(run, cfg)
    items, how = estimated(items, run, estimate)
    tasks = [t.name for t in cfg.tasks]
    best = choose(items, tasks, sizes, base_params, budget, latency)
    single = best_single(items, tasks, sizes, base_params, budget, latency)
    fold = run.record("fold") or {}
    points = [{"label": lb, "n_x_base": fold.get("ledgers", {}).get(lb, {}).get("total", {}).get("n_x_base"),
               "mean_test_acc": sum(i.test_acc for i in items if i.label == lb) / len(tasks)} for lb in bundles]
    out = run.root / "plans" / name
    first = next(iter(bundles.values()))
    info = first.manifest["backbone"]
    deltas = [bundles[i.label].delta(t) for t, i in best.items.items()]
    from pipeline.core.backbones import Backbone

    backbone = Backbone(info["name"], first.base.features, info["num_features"], tuple(info["mean"]),
                        tuple(info["std"]), info["kwargs"], info.get("interpolation", "bilinear"),
                        info.get("crop_pct", 0.875))
    methods = {t: bundles[i.label].manifest["method"]["name"] for t, i in best.items.items()}
    manifest = write_bundle(out / "bundle", backbone, backbone_id(backbone, info.get("weights", ""), info["image_size"]),
                            deltas, {"name": "plan", "label": name, "tasks": methods,
                                     "entries": {t: i.label for t, i in best.items.items()}},
                            {t: first.manifest["tasks"][t]["num_classes"] for t in tasks},
                            {t: {"crop_pct": first.manifest["tasks"][t].get("crop_pct")} for t in tasks})
    record = {"name": name, "budget": budget, "latency": latency, "n_x_base": manifest["ledger"]["total"]["n_x_base"],
              "estimate": {"kind": estimate, "how": how}, "mean_estimated_acc": best.mean_estimate,
              "mean_val_acc": best.mean_val, "mean_test_acc": best.mean_test,
              "chosen": {t: {"label": i.label, "method": methods[t], "val_acc": i.val_acc, "estimated_acc": i.score,
                             "test_acc": i.test_acc, "params": i.params, "latency": i.latency}
                         for t, i in best.items.items()},
              "single": single and {"label": next(iter(single.items.values())).label, "n_x_base": single.n_x_base,
                                    "mean_val_acc": single.mean_val, "mean_test_acc": single.mean_test},
              "entries": points, "bundle": run.rel(out / "bundle")}
    write_json(out / "plan.json", record)
    log(f"plan {name}: {record['n_x_base']:.3f} x base (budget {budget:g}x), mean val acc {best.mean_val:.4f} "
        f"(estimated {best.mean_estimate:.4f}; {how}), test {best.mean_test:.4f}: " + ", ".join(f"{t} <- {i.label}" for t, i in best.items.items()))
    return record


def plans_section(run, plots: Path) -> tuple[list[str], dict[str, str]]:
    """The report's plans: a table per plan and the accuracy-storage plot with the Pareto front."""
    records = [read_json(p) for p in sorted((run.root / "plans").glob("*/plan.json"))]
    if not records:
        return [], {}
    lines = ["", "## Budget plans", "",
             "Per task the entry with the best estimated accuracy such that the set fits the budget (`taskfold "
             "plan`); the chosen set is a bundle of its own. The estimate is the validation accuracy shrunk toward "
             "the entry's strength on the other tasks (`--estimate shrunk`), or as measured (`raw`). The best single "
             "entry is the one entry, for every task, that a mixed plan has to beat within the same budget.", "",
             "| plan | estimate | N x base | mean val acc | mean estimated | mean test acc | best single entry: N x "
             "base, test acc | " + " | ".join(records[0]["chosen"]) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(records[0]["chosen"])]
    for r in records:
        kind = (r.get("estimate") or {}).get("kind", "raw")
        lines.append(f"| {r['name']} | {kind} | {r['n_x_base']:.3f} | {r['mean_val_acc']:.4f} | "
                     f"{fmt(r.get('mean_estimated_acc', r['mean_val_acc']), '.4f')} | {r['mean_test_acc']:.4f} | "
                     + (f"{s['label']}: {s['n_x_base']:.3f}, {s['mean_test_acc']:.4f} | " if (s := r.get("single"))
                        else "none fits | ")
                     + " | ".join(f"{c['label']} ({c['test_acc']:.3f})" for c in r["chosen"].values()) + " |")
    name = "plans_pareto.png"
    plot_front(records, plots / name)
    return lines, {"Budget plans: accuracy against storage, with the Pareto front": name}


def pareto(points: list[dict]) -> list[dict]:
    """The points no other point beats on both storage (smaller) and accuracy (higher)."""
    pts = [p for p in points if p["n_x_base"] is not None]
    return sorted((p for p in pts if not any(q["n_x_base"] <= p["n_x_base"] and q["mean_test_acc"] >= p["mean_test_acc"]
                                             and q is not p and (q["n_x_base"], q["mean_test_acc"]) !=
                                             (p["n_x_base"], p["mean_test_acc"]) for q in pts)),
                  key=lambda p: p["n_x_base"])


def plot_front(records: list[dict], path: Path) -> None:
    from pipeline.core.plotting import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    points = [p for p in records[0]["entries"] if p["n_x_base"] is not None]
    ax.scatter([p["n_x_base"] for p in points], [p["mean_test_acc"] for p in points], color="grey", s=40, zorder=3)
    for p in points:
        ax.annotate(p["label"], (p["n_x_base"], p["mean_test_acc"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    fr = pareto(points)
    ax.plot([p["n_x_base"] for p in fr], [p["mean_test_acc"] for p in fr], color="black", lw=1, label="Pareto front")
    for r in records:
        ax.scatter([r["n_x_base"]], [r["mean_test_acc"]], marker="*", s=160, zorder=4,
                   label=f"{r['name']} ({fmt(r['n_x_base'], '.2f')}x)")
    ax.set_xlabel("stored parameters, N x base (all tasks)")
    ax.set_ylabel("mean test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Entries, their Pareto front, and the budget plans")
    fig.tight_layout()
    save_png(fig, path)
