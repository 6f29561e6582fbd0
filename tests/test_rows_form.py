"""The rows form: task tensors stored as their new rows plus an index, assembled in the graph.
Each new row is stored once for the method, the assembly reproduces every task tensor exactly,
onnxruntime folds it away at load, and the files come to the bundle's bytes (own rows and
pointers, base once)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from exporters.latency import runner
from exporters.loader import Loader
from exporters.rowshare import BASE, plan_rows
from pipeline.config import parse_config
from pipeline.core.io import read_json
from pipeline.stages.runner import Runner
from tests.conftest import tiny_config


def _rebuild(plan, base, name, task):
    a = plan.tasks[task][name]
    table = np.concatenate([base[name] if s == BASE else plan.rows[name, s] for s in a.sources])
    return table[a.index]


def test_each_new_row_is_stored_once_and_every_tensor_rebuilds_exactly():
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal((6, 8)).astype(np.float32), "same": rng.standard_normal((4, 8)).astype(np.float32),
            "all_new": rng.standard_normal((4, 8)).astype(np.float32)}
    a = {"w": base["w"].copy(), "same": base["same"].copy(), "all_new": base["all_new"] + 1}
    a["w"][[1, 4]] += 1.0  # two rows of its own
    b = {"w": base["w"].copy(), "same": base["same"].copy(), "all_new": base["all_new"] + 2}
    b["w"][1] = a["w"][1]  # borrows a's row 1
    b["w"][5] -= 1.0  # and has one of its own
    tasks = {"a": a, "b": b}
    plan = plan_rows(base, tasks, min_bytes=0)
    assert np.array_equal(plan.rows["w", "a"], a["w"][[1, 4]])
    assert np.array_equal(plan.rows["w", "b"], b["w"][[5]])  # a's row is not stored again
    assert plan.tasks["b"]["w"].sources == [BASE, "a", "b"]
    for task, tensors in tasks.items():
        assert np.array_equal(_rebuild(plan, base, "w", task), tensors["w"])
        # equal to the base: the shared form's job; nothing repeated: stored whole
        assert set(plan.tasks[task]) == {"w"}
    assert plan.saved_bytes(tasks) == 2 * base["w"].nbytes - 3 * base["w"][0].nbytes
    assert plan_rows(base, tasks, min_bytes=base["w"].nbytes + 1).assembled() == 0  # small tensors stay inline
    # a vector's "rows" are single numbers: one repeated by chance is no reason to assemble it
    vec = {"scale": np.arange(8, dtype=np.float32)}
    moved = {"scale": vec["scale"] * 2}  # 0 and 2, 4, 6 repeat
    assert plan_rows(vec, {"a": moved}, min_bytes=0).assembled() == 0


@pytest.fixture(scope="module")
def rows_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rows")
    cfg = tiny_config(tmp, methods=["linear_probe", "finetune", {"name": "cwps", "lam": 0.5}], export={"forms": ["shared", "rows"]},
                      bench={"warmup": 1, "runs": 2, "batch_sizes": [2], "forms": False})
    cfg["backbone"]["kwargs"] = {"width": 32}  # convs large enough to leave the graph for the data files
    out = tmp / "run"
    Runner(parse_config(cfg), out, progress=False, log=lambda s: None).run(until="export")
    return out, read_json(out / "exports" / "forms.json")


def _bytes(exports, spec):
    return sum((exports / f).stat().st_size for f in spec["files"])


def test_cwps_rows_form_stores_what_its_bundle_stores_and_answers_as_merged(rows_run):
    out, forms = rows_run
    exports = out / "exports"
    spec = forms["methods"]["cwps"]["rows"]
    bundle = sum(p.stat().st_size for p in (out / "bundles" / "cwps").rglob("*") if p.is_file())
    assert _bytes(exports, spec) <= 1.1 * bundle  # own rows, pointers and the base once
    shared = forms["methods"]["cwps"]["shared"]
    own = lambda s: sum((exports / f).stat().st_size for f in s["files"] if f.endswith(".data"))  # noqa: E731
    assert own(spec) - forms["base_data"]["bytes"] < 0.8 * own(shared)  # rows instead of whole tensors
    loader = Loader(exports, 1)
    x = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)
    for task, rel in spec["tasks"].items():
        assert any(n.op_type == "Gather" for n in onnx.load(str(exports / rel), load_external_data=False).graph.node)
        got = runner(loader.open(rel, spec["shared_weights"]))(x)[0]
        np.testing.assert_allclose(got, runner(loader.open(f"cwps/{task}.onnx"))(x)[0], rtol=1e-5, atol=1e-5)
    # a method whose tensors never repeat rows gets no rows form, with the reason
    assert "no tensor repeats rows" in forms["methods"]["linear_probe"]["rows"]["unavailable"]
    assert "unavailable" in forms["methods"]["finetune"]["rows"]  # every row of its own: nothing to save


def test_onnxruntime_folds_the_assembly_when_the_session_starts(rows_run, tmp_path):
    """What makes the form run at merged latency: no Gather or Concat is left to run per request."""
    import onnxruntime as ort

    out, forms = rows_run
    exports = out / "exports"
    rel = forms["methods"]["cwps"]["rows"]["tasks"]["digits"]
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(exports / rel), opts, providers=["CPUExecutionProvider"])
    nodes = onnx.load(str(tmp_path / "optimised.onnx"), load_external_data=False).graph.node
    assert not [n.name for n in nodes if n.name.endswith(("::gather", "::concat"))]
