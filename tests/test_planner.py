"""The budget planner: exact on a constructed case, and its bundle is a bundle like any other."""
from __future__ import annotations

import pytest
import torch
import yaml

import exporters
from pipeline.cli import main
from pipeline.core.bundle import load_bundle
from pipeline.core.fold import compare
from pipeline.planner import Item, PlanError, best_single, choose, n_x_base, pareto
from pipeline.shrinkage import shrink
from tests.conftest import tiny_config

SIZES = {"w": 90, "v": 10}  # two base tensors, 100 values


def item(label, task, acc, params, covers=(), refs=()):
    return Item(label, task, acc, acc, params, frozenset(covers), None, frozenset(refs))


ITEMS = [
    item("probe", "a", 0.70, 1), item("probe", "b", 0.60, 1),
    item("full", "a", 0.90, 100, ("w", "v")), item("full", "b", 0.85, 100, ("w", "v")),
    item("lowrank", "a", 0.74, 30), item("lowrank", "b", 0.80, 20),
]


@pytest.mark.parametrize("budget, want, cost", [
    (1.05, {"a": "probe", "b": "probe"}, 1.02),
    (1.25, {"a": "probe", "b": "lowrank"}, 1.21),  # greedy by gain per value would take lowrank for a first
    (1.55, {"a": "lowrank", "b": "lowrank"}, 1.50),
    (2.00, {"a": "full", "b": "full"}, 2.00),  # every task replaces the base: it is no longer stored
    (1.99, {"a": "lowrank", "b": "lowrank"}, 1.50),  # full for a alone keeps the base in use: 2.20
])
def test_the_choice_is_the_best_the_budget_buys(budget, want, cost):
    c = choose(ITEMS, ["a", "b"], SIZES, 100, budget)
    assert {t: i.label for t, i in c.items.items()} == want
    assert c.n_x_base == pytest.approx(cost)
    # exhaustive check: nothing within the budget has a higher mean validation accuracy
    import itertools

    for combo in itertools.product([i for i in ITEMS if i.task == "a"], [i for i in ITEMS if i.task == "b"]):
        if n_x_base(combo, SIZES, 100) <= budget:
            assert sum(i.val_acc for i in combo) / 2 <= c.mean_val + 1e-12


def test_the_best_single_entry_is_the_most_accurate_one_that_fits_alone():
    assert best_single(ITEMS, ["a", "b"], SIZES, 100, 1.25).items["a"].label == "probe"  # a mix buys lowrank for b
    assert best_single(ITEMS, ["a", "b"], SIZES, 100, 1.55).items["b"].label == "lowrank"
    assert best_single(ITEMS, ["a", "b"], SIZES, 100, 2.0).mean_val == pytest.approx(0.875)  # full
    assert best_single(ITEMS, ["a", "b"], SIZES, 100, 0.5) is None


def test_borrowers_come_with_what_they_borrow_and_a_budget_too_small_is_named():
    items = ITEMS + [item("cwps", "a", 0.95, 5, refs=("b",)), item("cwps", "b", 0.60, 5)]
    c = choose(items, ["a", "b"], SIZES, 100, 1.25)
    assert {t: i.label for t, i in c.items.items()} == {"a": "cwps", "b": "cwps"}  # not cwps for a with lowrank b
    with pytest.raises(PlanError, match=r"no combination of the run's entries fits --budget 0\.5x"):
        choose(ITEMS, ["a", "b"], SIZES, 100, 0.5)


TASKS = ["a", "b", "c", "d"]


# ``steady`` leads on three tasks by 4-5 points; on ``d`` ``lucky`` is ahead by 1 point
ROWS = {"steady": [0.90, 0.82, 0.78, 0.79], "lucky": [0.86, 0.77, 0.74, 0.80],
        "probe": [0.80, 0.72, 0.70, 0.70], "other": [0.88, 0.78, 0.75, 0.74]}


def best_per_task(est: dict) -> dict:
    return {t: max((lb for lb, u in est if u == t), key=lambda lb: est[lb, t]) for t in TASKS}


def test_a_lead_within_the_noise_of_the_split_does_not_outweigh_an_entry_s_consistent_strength():
    acc = {(lb, t): v for lb, vs in ROWS.items() for t, v in zip(TASKS, vs)}
    assert best_per_task(acc)["d"] == "lucky"
    noisy = shrink(acc, {t: 200 for t in TASKS})  # 3 points of noise on one accuracy
    assert best_per_task(noisy.estimates)["d"] == "steady"
    exact = shrink(acc, {t: 10 ** 9 for t in TASKS})  # the same lead, measured on a huge split, is real
    assert best_per_task(exact.estimates)["d"] == "lucky"
    assert exact.estimates[("lucky", "d")] == pytest.approx(0.80, abs=1e-4)
    grand = sum(acc.values()) / len(acc)
    for (lb, t), v in noisy.estimates.items():  # each estimate lies between the additive fit and the measurement
        fit = sum(acc[x, t] for x in ROWS) / len(ROWS) + sum(acc[lb, u] for u in TASKS) / len(TASKS) - grand
        assert min(acc[lb, t], fit) - 1e-12 <= v <= max(acc[lb, t], fit) + 1e-12
    one = shrink({("only", t): 0.8 for t in TASKS}, {t: 200 for t in TASKS})
    assert one.tau is None and one.estimates == {("only", t): 0.8 for t in TASKS}


def test_shrunk_choices_are_more_accurate_than_raw_ones_on_noisy_validation_splits():
    """Simulated runs: true accuracy = task level + entry strength + interaction, measured on 200
    validation images. Picking by the shrunk estimate must buy more true accuracy on average; on
    noise-free splits the two pick alike."""
    import numpy as np

    rng = np.random.default_rng(0)
    labels = [f"e{i}" for i in range(7)]
    gain, same = [], 0
    for _ in range(150):
        true = np.clip(rng.uniform(0.7, 0.95, 4)[None, :] + rng.normal(0, 0.03, (7, 1)) + rng.normal(0, 0.01, (7, 4)),
                       0.01, 0.99)
        truth = {(lb, t): true[i, j] for i, lb in enumerate(labels) for j, t in enumerate(TASKS)}
        val = {c: rng.binomial(200, p) / 200 for c, p in truth.items()}
        picks = [best_per_task(val), best_per_task(shrink(val, {t: 200 for t in TASKS}).estimates)]
        gain.append([np.mean([truth[p[t], t] for t in TASKS]) for p in picks])
        exact = best_per_task(shrink(truth, {t: 10 ** 9 for t in TASKS}).estimates)
        same += all(truth[exact[t], t] == pytest.approx(truth[p, t], abs=1e-6) for t, p in best_per_task(truth).items())
    raw, shrunk = np.mean(gain, axis=0)
    assert shrunk > raw + 0.002, (raw, shrunk)
    assert same == 150


def test_pareto_front():
    pts = [{"label": "a", "n_x_base": 1.0, "mean_test_acc": 0.7}, {"label": "b", "n_x_base": 2.0, "mean_test_acc": 0.6},
           {"label": "c", "n_x_base": 3.0, "mean_test_acc": 0.9}]
    assert [p["label"] for p in pareto(pts)] == ["a", "c"]


def test_plan_writes_a_bundle_that_loads_merges_and_exports(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path, methods=["linear_probe", "norm_head", "finetune",
                                                                  {"name": "lora", "rank": 2}])))
    run = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(run), "--no-progress"]) == 0
    assert main(["plan", str(run), "--budget", "1.3x"]) == 0
    bundle = load_bundle(run / "plans" / "budget-1.3x" / "bundle")
    import json

    plan = json.loads((run / "plans" / "budget-1.3x" / "plan.json").read_text())
    assert plan["n_x_base"] <= 1.3 and bundle.ledger["total"]["n_x_base"] == pytest.approx(plan["n_x_base"])
    for task, chosen in plan["chosen"].items():  # each task is its entry's own model
        src = load_bundle(run / "bundles" / chosen["label"])
        x = torch.randn(8, 3, 16, 16)
        assert compare(src.merged(task), bundle.merged(task), x)["max_abs_diff"] == 0
    exporters.export(bundle, tmp_path / "deploy", forms=["shared"], log=lambda s: None)
    assert (tmp_path / "deploy" / "forms.json").is_file()
    assert plan["estimate"]["kind"] == "shrunk" and all("estimated_acc" in c for c in plan["chosen"].values())
    single = plan["single"]
    assert single["n_x_base"] <= 1.3 and plan["mean_val_acc"] >= single["mean_val_acc"] - 0.05
    assert single["mean_test_acc"] == pytest.approx(sum(json.loads((run / "train" / single["label"] / t / "result.json")
                                                                   .read_text())["test_acc"] for t in bundle.tasks)
                                                    / len(bundle.tasks))
    assert main(["plan", str(run), "--budget", "1.3x", "--estimate", "raw"]) == 0
    raw = json.loads((run / "plans" / "budget-1.3x-raw" / "plan.json").read_text())
    assert raw["estimate"]["kind"] == "raw" and all(c["estimated_acc"] == c["val_acc"] for c in raw["chosen"].values())
    assert main(["run", str(cfg), "--out", str(run), "--no-progress"]) == 0  # the report shows the plans
    report = (run / "report.md").read_text()
    assert "## Budget plans" in report and "| budget-1.3x-raw | raw |" in report and "| budget-1.3x | shrunk |" in report
    assert main(["plan", str(run), "--budget", "0.5x"]) == 2
    assert "no combination of the run's entries fits --budget 0.5x" in capsys.readouterr().err
    assert main(["plan", str(run), "--budget", "lots"]) == 2
