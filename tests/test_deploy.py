"""Deployment forms: shared external data, shared initializers, adapter switching, low-rank
branches, edge variants, and the bench that measures them."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from exporters.adapters import AdapterTarget, write_switch
from exporters.bench import _memory_mb
from exporters.forms import FORMS, OPTIONAL
from exporters.datafiles import BASE_DATA, FormError, SharedWriter, external_info
from exporters.precision import Int8Recipe, to_fp16, to_int8
from exporters.weights import SharedWeights
from exporters.latency import runner
from exporters.onnx import OnnxExporter
from exporters.runtime import session
from exporters.runtime import RuntimeUnavailable
from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.core.delta import CPPart, LowRank
from pipeline.core.io import read_json
from pipeline.report.deploy import rank_forms, ranking_lines, worse_than_merged
from pipeline.stages.runner import Runner
from tests.conftest import tiny_config


def _task_model(bb, seed: int, classes: int = 10, touch_convs: bool = True):
    """A base copy with a new head, new norms, and (optionally) changed conv weights."""
    model = bb.task_net(classes, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.add_(torch.randn(m.weight.shape, generator=g) * 0.1)
                m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            if touch_convs and isinstance(m, nn.Conv2d):
                m.weight.add_(torch.randn(m.weight.shape, generator=g) * 0.05)
    return model


@pytest.fixture()
def graphs(tmp_path, backbones, digits16):
    """Base + two tasks of the tiny convnet as ONNX: one with its own convs, one sharing them."""
    bb, size = backbones["tiny_convnet"]
    exporter = OnnxExporter(size)
    paths = {"base": exporter.export(bb.task_net(10, seed=0).eval(), tmp_path / "base.onnx"),
             "own_convs": exporter.export(_task_model(bb, 1), tmp_path / "own_convs.onnx"),
             "norms_only": exporter.export(_task_model(bb, 2, touch_convs=False), tmp_path / "norms_only.onnx")}
    x = digits16.test.inputs().numpy()
    return paths, x


def _ref(path, x):
    return runner(session(path, 1))(x)[0]


def test_shared_form_writes_the_base_once_and_every_task_reads_it(tmp_path, graphs):
    paths, x = graphs
    out = tmp_path / "shared"
    w = SharedWriter(out, onnx.load(str(paths["base"])), inline_bytes=0)
    info = {t: w.write_graph(t, onnx.load(str(paths[t]))) for t in ("own_convs", "norms_only")}
    assert [p.name for p in out.glob("*.data")].count(BASE_DATA) == 1
    # the task that kept the base convs stores less of its own and points more into base.data
    assert info["norms_only"]["shared_tensors"] > info["own_convs"]["shared_tensors"]
    assert info["norms_only"]["data_bytes"] < info["own_convs"]["data_bytes"]
    g = onnx.load(str(out / "norms_only.onnx"), load_external_data=False)
    external = [i for i in g.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert {external_info(i)["location"] for i in external} == {BASE_DATA, "norms_only.data"}
    # every float tensor is stored outside; integer ones (axes, shapes) stay for shape inference
    inline = [i for i in g.graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL]
    assert inline and all(onnx.helper.tensor_dtype_to_np_dtype(i.data_type).kind == "i" for i in inline)
    assert all(onnx.helper.tensor_dtype_to_np_dtype(i.data_type).kind == "f" for i in external)
    weights = SharedWeights(out)
    shared = {t: weights.initializers(out / f"{t}.onnx") for t in info}
    common = set(shared["own_convs"]) & set(shared["norms_only"])
    assert common and all(shared["own_convs"][n] is shared["norms_only"][n] for n in common)  # one copy in memory
    for t in info:
        got = runner(session(out / f"{t}.onnx", 1, initializers=shared[t]))(x)[0]
        np.testing.assert_array_equal(got, _ref(paths[t], x))
        plain = runner(session(out / f"{t}.onnx", 1))(x)[0]  # also loadable without sharing
        np.testing.assert_array_equal(plain, got)


def test_switch_form_adapters_reproduce_each_task(tmp_path, graphs):
    paths, x = graphs
    out = tmp_path / "shared"
    w = SharedWriter(out, onnx.load(str(paths["base"])), inline_bytes=0)
    tasks = {t: onnx.load(str(paths[t])) for t in ("own_convs", "norms_only")}
    info = write_switch(w, "m", tasks, onnx.load(str(paths["base"])))
    assert "head.weight" in info["inputs"] and info["adapters"]["norms_only"]["bytes"] > 0
    sess = session(out / "m.switch.onnx", 1, initializers=SharedWeights(out).initializers(out / "m.switch.onnx"))
    for t in tasks:  # one session, each task by its adapter, in turn
        got = AdapterTarget(sess, out / info["adapters"][t]["file"])(x)[0]
        np.testing.assert_allclose(got, _ref(paths[t], x), atol=1e-5)


def test_switch_form_handles_heads_of_different_sizes(tmp_path, backbones, digits16):
    bb, size = backbones["tiny_convnet"]
    exporter = OnnxExporter(size)
    a = exporter.export(_task_model(bb, 1, classes=10), tmp_path / "a.onnx")
    b = exporter.export(_task_model(bb, 2, classes=4), tmp_path / "b.onnx")
    w = SharedWriter(tmp_path / "s", onnx.load(str(a)), inline_bytes=0)
    # different head shapes are different traces: same nodes still, so the switch form works
    info = write_switch(w, "m", {"a": onnx.load(str(a)), "b": onnx.load(str(b))}, onnx.load(str(a)))
    sess = session(tmp_path / "s" / "m.switch.onnx", 1)
    x = digits16.test.inputs(5).numpy()
    out_b = AdapterTarget(sess, tmp_path / "s" / info["adapters"]["b"]["file"])(x)[0]
    assert out_b.shape == (5, 4)
    np.testing.assert_allclose(out_b, _ref(b, x), atol=1e-5)


def test_switch_form_refuses_graphs_of_different_structure(tmp_path, backbones):
    bb, size = backbones["tiny_convnet"]
    vit, vsize = backbones["tiny_vit"]
    a = OnnxExporter(size).export(bb.task_net(10).eval(), tmp_path / "a.onnx")
    b = OnnxExporter(vsize).export(vit.task_net(10).eval(), tmp_path / "b.onnx")
    w = SharedWriter(tmp_path / "s", onnx.load(str(a)))
    with pytest.raises(FormError, match="differ in structure"):
        write_switch(w, "m", {"a": onnx.load(str(a)), "b": onnx.load(str(b))}, onnx.load(str(a)))


@pytest.mark.parametrize("layer, axes", [
    (nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=False), [5, 6, 9]),
    (nn.Conv2d(6, 5, 1, bias=True), [5, 6]),
    (nn.Linear(7, 4), [4, 7]),
])
def test_lowrank_branch_equals_the_merged_layer(layer, axes):
    torch.manual_seed(0)
    delta = LowRank([CPPart([torch.randn(3, n) * 0.1 for n in axes])])
    x = torch.randn(2, 6, 8, 8) if isinstance(layer, nn.Conv2d) else torch.randn(2, 7)
    branch = delta.branch(layer)
    assert branch is not None
    merged = delta.apply(copy.deepcopy(layer))
    torch.testing.assert_close(branch(x), merged(x), atol=1e-5, rtol=1e-5)
    assert branch.base is layer  # the base layer is kept as it is: its weights stay shared
    own = sum(p.numel() for n, p in branch.named_parameters() if not n.startswith("base."))
    assert own == 3 * (axes[0] + int(np.prod(axes[1:])))  # R (C_out + C_in k^2)


def test_grouped_convs_have_no_branch():
    dw = nn.Conv2d(6, 6, 3, groups=6, bias=False)
    assert LowRank([CPPart([torch.randn(2, 6), torch.randn(2, 9)])]).branch(dw) is None


def test_edge_variants_run_and_stay_close(tmp_path, graphs):
    paths, x = graphs
    fp16 = to_fp16(paths["own_convs"], tmp_path / "m.fp16.onnx")
    int8 = to_int8(paths["own_convs"], tmp_path / "m.int8.onnx", x[:32])
    ref = _ref(paths["own_convs"], x)
    g16 = onnx.load(str(fp16))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in g16.graph.initializer)
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(int8)).graph.node)
    for path in (fp16, int8):
        got = _ref(path, x)
        assert got.shape == ref.shape and np.isfinite(got).all()
        assert np.abs(got - ref).max() < 0.5 * np.abs(ref).max()  # sanity, not an accuracy claim


def test_edge_variants_made_in_worker_processes_equal_those_made_here(tmp_path, graphs):
    """The export builds INT8 and FP16 variants two at a time in spawned processes, in the
    background while it builds other forms (``submit``, collected by ``wait``): the files must be
    the bytes one process writes, metadata included, and a worker's error must reach the caller
    with its message when that form is waited for, leaving no file."""
    from exporters.forms.base import BuildContext
    from exporters.forms.edge import fp16_variant, int8_variant

    paths, x = graphs
    srcs = [paths["own_convs"], paths["norms_only"]]
    for p in srcs:
        model = onnx.load(str(p))
        onnx.helper.set_model_props(model, {"taskfold.task": p.stem})
        onnx.save_model(model, str(p))
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    for src in srcs:
        int8_variant(src, here / f"{src.stem}.int8.onnx", x[:32], Int8Recipe())
        fp16_variant(src, here / f"{src.stem}.fp16.onnx")
    ctx = BuildContext(tmp_path, None, None, None, {}, workers=2)
    try:
        ctx.submit(("m", "int8"), int8_variant, srcs, [there / f"{s.stem}.int8.onnx" for s in srcs], [x[:32]] * 2,
                   [Int8Recipe()] * 2)
        ctx.submit(("m", "broken"), fp16_variant, [tmp_path / "missing.onnx"] * 2, [there / "a.onnx", there / "b.onnx"])
        ctx.map(fp16_variant, srcs, [there / f"{s.stem}.fp16.onnx" for s in srcs])
        assert ctx._pool is not None  # it did use processes
        assert ctx.wait(("m", "int8")) > 0  # the workers' seconds
        assert ctx.wait(("m", "never submitted")) == 0
        with pytest.raises(Exception, match="missing.onnx"):
            ctx.wait(("m", "broken"))
        ctx.submit(("n", "int8"), int8_variant, srcs, [tmp_path / f"{s.stem}.dropped.onnx" for s in srcs],
                   [x[:32]] * 2, [Int8Recipe()] * 2)
    finally:
        ctx.close()  # not waited for: dropped or finished whole, and close does not raise
    for src in srcs:
        dropped = tmp_path / f"{src.stem}.dropped.onnx"
        assert not dropped.exists() or dropped.read_bytes() == (here / f"{src.stem}.int8.onnx").read_bytes()
    for f in sorted(here.iterdir()):
        assert (there / f.name).read_bytes() == f.read_bytes(), f.name
    assert read_metadata_task(there / "norms_only.int8.onnx") == "norms_only"
    assert not (there / "a.onnx").exists() and not (there / "b.onnx").exists()


def read_metadata_task(path) -> str:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}["taskfold.task"]


@pytest.mark.parametrize("recipe", [Int8Recipe(), Int8Recipe(reduce_range=False, float_first_conv=False)])
def test_int8_folds_norms_and_follows_its_recipe(tmp_path, graphs, recipe):
    paths, x = graphs
    graph = onnx.load(str(to_int8(paths["own_convs"], tmp_path / "m.int8.onnx", x[:32], recipe=recipe))).graph
    made_by = {o: n for n in graph.node for o in n.output}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert not any(n.op_type == "BatchNormalization" for n in graph.node)  # folded before quantising
    quantised = [c.input[1] in made_by and made_by[c.input[1]].op_type == "DequantizeLinear" for c in convs]
    assert quantised[0] is not recipe.float_first_conv and all(quantised[1:])  # by default the input layer stays float
    def top(conv):  # 7 bits avoid VPMADDUBSW saturation; the depthwise kernel widens first, so keeps 8
        depthwise = next((a.i for a in conv.attribute if a.name == "group"), 1) > 1
        return 64 if recipe.reduce_range and not (depthwise and recipe.depthwise_full_range) else 127

    weights = {c.name: (inits[made_by[c.input[1]].input[0]], top(c)) for c in convs if c.input[1] in made_by}
    if recipe.reduce_range:  # the tiny convnet has a depthwise conv and dense ones: both widths show
        assert {t for _, t in weights.values()} == {64, 127}
    assert all(w.dtype == np.int8 and np.abs(w.astype(int)).max() == t for w, t in weights.values())


def test_bias_correction_takes_out_the_mean_shift_of_rounded_weights(tmp_path):
    """A conv whose inputs have a large mean: rounding its weights to 7 bits shifts every output
    channel's mean by (W_q - W) E[x]. With bias correction the INT8 model's mean output matches
    FP32's to a small part of that shift; without it, it does not."""
    import torch

    from exporters.onnx import OnnxExporter

    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 1))
    for conv in net:
        conv.weight.data = torch.randn(conv.weight.shape, generator=gen) * 0.3
    src = OnnxExporter(8).export(net.eval(), tmp_path / "net.onnx")
    x = (np.random.default_rng(0).standard_normal((64, 3, 8, 8)) + 3).astype(np.float32)  # mean 3 per channel
    ref = _ref(src, x).mean(axis=(0, 2, 3))
    shift = {}
    for on in (False, True):
        recipe = Int8Recipe(bias_correction=on, float_first_conv=False)
        got = _ref(to_int8(src, tmp_path / f"net.{on}.onnx", x, recipe=recipe), x).mean(axis=(0, 2, 3))
        shift[on] = np.abs(got - ref).mean()
    assert shift[True] < 0.3 * shift[False], shift


def test_int8_float_last_and_percentile_calibration_change_what_they_say(tmp_path, graphs):
    paths, x = graphs

    def quantised_layers(recipe, name):
        graph = onnx.load(str(to_int8(paths["own_convs"], tmp_path / name, x[:32], recipe=recipe))).graph
        made_by = {o: n for n in graph.node for o in n.output}
        layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
        scales = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith("_scale")}
        return [n.input[1] in made_by and made_by[n.input[1]].op_type == "DequantizeLinear" for n in layers], scales

    default, minmax = quantised_layers(Int8Recipe(), "a.onnx")
    last, _ = quantised_layers(Int8Recipe(float_last=1), "b.onnx")
    assert default[-1] and not last[-1] and last[1:-1] == default[1:-1]  # only the last layer left float
    _, pct = quantised_layers(Int8Recipe(calibration="percentile", percentile=99.0), "c.onnx")
    activation = [k for k in minmax if k in pct and minmax[k].size == 1 and "input" not in k]
    assert any(pct[k] < minmax[k] for k in activation)  # clipped ranges: finer steps for the bulk


def test_run_builds_checks_and_benches_every_form(tmp_path):
    cfg = tiny_config(tmp_path, methods=["norm_head", {"name": "ftn", "rank": 2}],
                      export={"forms": OPTIONAL, "calibration_images": 16, "int8": {"reduce_range": False}},
                      bench={"warmup": 1, "runs": 3, "batch_sizes": [2], "forms": True})
    cfg["backbone"]["kwargs"] = {"width": 32}  # convs large enough to leave the graph for base.data
    out = tmp_path / "run"
    Runner(parse_config(cfg), out, progress=False, log=lambda s: None).run()
    exports = out / "exports"
    forms = read_json(exports / "forms.json")
    # every registered form is built for a bundle with low-rank deltas
    assert set(forms["methods"]["ftn"]) == set(FORMS)
    assert not any("unavailable" in spec for name, spec in forms["methods"]["ftn"].items() if name != "rows")
    assert "no tensor repeats rows" in forms["methods"]["ftn"]["rows"]["unavailable"]  # FTN changes every row
    # no low-rank deltas, no branch form: said so, not built
    assert set(forms["methods"]["norm_head"]["branch"]) == {"unavailable"}
    assert set(forms["methods"]["norm_head"]["branch_switch"]) == {"unavailable"}
    int8 = onnx.load(str(exports / forms["methods"]["ftn"]["int8"]["tasks"]["digits"])).graph
    assert max(np.abs(onnx.numpy_helper.to_array(i).astype(int)).max() for i in int8.initializer
               if i.data_type == onnx.TensorProto.INT8) == 127  # the config's recipe: full 8-bit weights
    checks = read_json(out / "stages" / "export.json")["form_checks"]
    for key, c in checks.items():
        form = key.split("/")[-1]
        if form in FORMS and FORMS[form].lossy:
            assert 0 <= c["accuracy"] <= 1
        else:  # exact forms, and the branch graphs against torch
            assert c["max_abs_diff"] < 1e-4 and c["argmax_agree"] == 1.0, (key, c)
    # every form that was built was checked on every task (merged is the reference)
    # (no method here repeats rows: the rows form is built and checked in test_rows_form.py)
    assert {k.rsplit("/", 2)[-1] for k in checks} >= set(OPTIONAL) - {"rows"}
    # where the stage's time went: every form built or tried, merged's export timed, in the report too
    seconds = read_json(out / "stages" / "export.json")["seconds"]
    assert set(seconds) == set(FORMS) and seconds["merged"]["build"] > 0 and seconds["int8"]["check"] > 0
    report = (out / "report.md").read_text()
    assert "Export seconds per form" in report and "Bench seconds" in report
    bench = read_json(out / "stages" / "bench.json")
    assert {"open", "latency_batch2", "memory_and_switch"} <= set(bench["deploy"]["seconds"])
    deploy = bench["deploy"]
    # the merged models are timed once, among the forms: the latency table is that run's figures
    latency = bench["latency"]["batch2"]
    assert set(latency) == {"base", "base_repeat", "norm_head/digits", "norm_head/digits_neg", "ftn/digits",
                            "ftn/digits_neg"} and "measured" not in deploy
    assert latency["base"] == {**deploy["base"]["batch2"], "ratio_to_base": 1.0}
    for label, rows in deploy["methods"].items():
        merged = sorted(latency[f"{label}/{t}"]["median_ms"] for t in ("digits", "digits_neg"))
        assert rows["merged"]["latency"]["batch2"]["median_ms"] == pytest.approx(np.median(merged))
    for label, rows in deploy["methods"].items():
        for form, row in rows.items():
            spec = forms["methods"][label][form]
            assert row["bytes"] == sum((exports / f).stat().st_size for f in spec["files"])  # ledger == disk
            assert row["resident_mb"] > 0 and row["switch_ms"] > 0 and row["library_code_mb"] >= 0
            assert row["switch_process"] == "own"  # timed beside its own sessions only, as memory is
            assert row["resident_vs_stored"] == pytest.approx(row["resident_mb"] * 2**20 / min(
                r["bytes"] for f, r in rows.items() if not FORMS[f].lossy))
    nh = deploy["methods"]["norm_head"]
    assert nh["shared"]["bytes"] < nh["merged"]["bytes"]  # norms and head only, the convs in base.data once
    assert deploy["methods"]["ftn"]["branch"]["bytes"] < deploy["methods"]["ftn"]["shared"]["bytes"]
    # the CLI re-measures the same run and the report shows both
    assert main(["bench", str(out), "--runs", "2", "--batch-sizes", "1", "--no-memory", "--name", "again",
                 "--prefer", "latency"]) == 0
    again = read_json(out / "bench" / "again.json")
    assert "batch1" in again["base"]
    assert {r["switch_process"] for rows in again["methods"].values() for r in rows.values()} == {"bench"}
    assert all(r["switch_ms"] > 0 for rows in again["methods"].values() for r in rows.values())
    if "CUDAExecutionProvider" not in _working_providers(exports / "base.onnx"):
        assert main(["bench", str(out), "--provider", "cuda", "--name", "gpu"]) == 2  # an error, not a CPU timing
        assert not (out / "bench" / "gpu.json").exists()
    Runner(parse_config(cfg), out, progress=False, log=lambda s: None).run()
    report = (out / "report.md").read_text()
    assert "## Deployment" in report and "### again" in report and "Edge variants" in report
    assert "by memory:" in report and "| verdict |" in report
    assert json.loads((out / "results.json").read_text())["deployment"]["devices"]


def _working_providers(path) -> list[str]:
    try:
        return session(path, 1, ["CUDAExecutionProvider", "CPUExecutionProvider"]).get_providers()
    except RuntimeUnavailable:
        return ["CPUExecutionProvider"]


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="resident memory is read from /proc (Linux)")
def test_resident_memory_counts_data_pages_and_leaves_library_code_out():
    total0, code0 = _memory_mb()
    data = np.ones(24 * 2**20 // 8)  # 24 MB of heap, every page touched
    total1, code1 = _memory_mb()
    assert 0 < code0 < total0  # the interpreter and numpy are mapped executable and resident
    assert total1 - total0 == pytest.approx(24, abs=1.5) and abs(code1 - code0) < 0.5
    del data


def test_a_provider_that_cannot_run_is_an_error_not_a_cpu_fallback(graphs):
    paths, _ = graphs
    try:
        sess = session(paths["base"], 1, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    except RuntimeUnavailable as err:  # the CPU wheel has no CUDA; the GPU wheel without a GPU cannot load it
        assert "CUDAExecutionProvider" in str(err) and ("--gpu" in str(err) or "did not load" in str(err))
    else:  # a GPU machine with onnxruntime-gpu: it really runs there
        assert sess.get_providers()[0] == "CUDAExecutionProvider"


def test_no_onnxruntime_fails_before_any_work_with_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(RuntimeUnavailable, match=r"onnxruntime is not installed.*setup\.sh --gpu"):
        Runner(parse_config(tiny_config(tmp_path)), tmp_path / "run", progress=False, log=lambda s: None).run()
    assert not (tmp_path / "run").exists()
    with pytest.raises(RuntimeUnavailable):
        session(tmp_path / "any.onnx")


def test_bench_needs_a_run_with_forms(tmp_path, capsys):
    assert main(["bench", str(tmp_path)]) == 2
    assert "forms.json: not found" in capsys.readouterr().err


def _row(bytes_vs_merged, lat1, lat8, resident=None, nbytes=100):
    return {"bytes": nbytes, "bytes_vs_merged": bytes_vs_merged, "resident_mb": resident,
            "latency": {"batch1": {"ratio_to_merged": lat1}, "batch8": {"ratio_to_merged": lat8}}}


def test_forms_ranked_by_priority_and_forms_worse_on_both_axes_named():
    rows = {"merged": _row(1.0, 1.0, 1.0, resident=100, nbytes=400),
            "shared": _row(0.3, 1.02, 0.99, resident=110, nbytes=120),
            "switch": _row(1.25, 3.1, 5.0, resident=60, nbytes=500),
            "int8": _row(0.26, 0.8, 0.7, resident=None, nbytes=104)}
    assert rank_forms(rows, "storage") == ["int8", "shared", "merged", "switch"]
    assert rank_forms(rows, "latency") == ["int8", "merged", "shared", "switch"]
    assert rank_forms(rows, "memory") == ["switch", "merged", "shared", "int8"]  # unmeasured memory last
    assert worse_than_merged(rows["switch"]) and not worse_than_merged(rows["shared"])
    assert not worse_than_merged(rows["merged"]) and not worse_than_merged(rows["int8"])
    line = ranking_lines({"methods": {"ftn": rows}}, "storage")[0]
    assert "switch (worse than merged on bytes and latency)" in line and "shared (worse" not in line
    with pytest.raises(ValueError, match="prefer"):
        rank_forms(rows, "speed")


def test_lossy_forms_that_lose_too_much_are_not_shipped(tmp_path):
    """A lossy form's check decides whether it ships: a drop beyond the threshold removes its
    files and says why in forms.json, and the other forms are unaffected."""
    from exporters.build import Thresholds
    from exporters.bundles import export_bundles
    from exporters.images import TaskImages
    from pipeline.core.bundle import load_bundle

    cfg = tiny_config(tmp_path, methods=["norm_head"])
    cfg["backbone"]["kwargs"] = {"width": 32}
    Runner(parse_config(cfg), tmp_path / "run", progress=False, log=lambda s: None).run(until="fold")
    bundle = load_bundle(tmp_path / "run" / "bundles" / "norm_head")
    rng = np.random.default_rng(0)
    images = {t: TaskImages.from_arrays(rng.standard_normal((8, 3, 16, 16), dtype=np.float32),
                                        rng.standard_normal((20, 3, 16, 16), dtype=np.float32), np.zeros(20, np.int64))
              for t in bundle.tasks}
    out = tmp_path / "exports"
    export_bundles({"norm_head": bundle}, out, ["shared", "fp16", "int8"], images, threads=1, log=lambda s: None,
                   thresholds=Thresholds(max_accuracy_drop=-1.0))  # no accuracy is good enough
    forms = read_json(out / "forms.json")["methods"]["norm_head"]
    for name in ("fp16", "int8"):
        assert forms[name]["unavailable"].startswith("failed its check"), forms[name]
        assert not list(out.glob(f"norm_head/*.{name}.onnx"))
    assert "unavailable" not in forms["shared"] and list(forms) == ["merged", "shared", "fp16", "int8"]


@pytest.mark.parametrize("limit", [None, 0, 5, 8, 11, 20, 50])
def test_exact_and_rest_batches_split_the_test_images_once_in_order(limit):
    """The merged model's full test logits are its exact-check logits plus the rest's: the two
    iterators must cover every image once, in the split's order, for any limit."""
    from exporters.images import TaskImages

    test = np.arange(20 * 3, dtype=np.float32).reshape(20, 3, 1, 1)
    images = TaskImages.from_arrays(test[:2], test, np.arange(20), batch=8)
    images.exact_limit = limit
    exact = [x for x in images.exact_batches()]
    rest = [x for x in images.rest_batches()]
    assert sum(map(len, exact)) == (20 if limit is None else min(limit, 20))
    assert np.array_equal(np.concatenate(exact + rest), test)
