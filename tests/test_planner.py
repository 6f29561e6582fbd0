"""The budget planner: exact on a constructed case, and its bundle is a bundle like any other."""
from __future__ import annotations

import pytest
import torch
import yaml

import exporters
from pipeline.cli import main
from pipeline.core.bundle import load_bundle
from pipeline.core.fold import compare
from pipeline.planner import Item, PlanError, choose, n_x_base, pareto
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


def test_borrowers_come_with_what_they_borrow_and_a_budget_too_small_is_named():
    items = ITEMS + [item("cwps", "a", 0.95, 5, refs=("b",)), item("cwps", "b", 0.60, 5)]
    c = choose(items, ["a", "b"], SIZES, 100, 1.25)
    assert {t: i.label for t, i in c.items.items()} == {"a": "cwps", "b": "cwps"}  # not cwps for a with lowrank b
    with pytest.raises(PlanError, match=r"no combination of the run's entries fits --budget 0\.5x"):
        choose(ITEMS, ["a", "b"], SIZES, 100, 0.5)


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
    assert main(["run", str(cfg), "--out", str(run), "--no-progress"]) == 0  # the report shows the plan
    assert "## Budget plans" in (run / "report.md").read_text()
    assert main(["plan", str(run), "--budget", "0.5x"]) == 2
    assert "no combination of the run's entries fits --budget 0.5x" in capsys.readouterr().err
    assert main(["plan", str(run), "--budget", "lots"]) == 2
