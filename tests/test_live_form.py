"""The live form: one session on a graph onnxruntime optimised for this CPU, task tensors copied
into its buffers on a switch. Every switch must give that task's merged outputs; files built for
another CPU or tampered with are refused, naming the file and tensor."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from safetensors.numpy import load_file, save_file

from exporters import channel_scales
from exporters.channel_scales import SUFFIX
from exporters.datafiles import FormError
from exporters.forms.live import Live, LiveSession
from exporters.latency import runner
from exporters.loader import Loader
from pipeline.config import parse_config
from pipeline.core.io import read_json
from pipeline.stages.runner import Runner
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    cfg = tiny_config(tmp, methods=["finetune", "norm_head", "linear_probe"], export={"forms": ["live", "bound"]},
                      bench={"warmup": 1, "runs": 2, "batch_sizes": [2], "forms": False})
    cfg["backbone"]["kwargs"] = {"width": 32}
    out = tmp / "run"
    Runner(parse_config(cfg), out, progress=False, log=lambda s: None).run(until="export")
    return out / "exports", read_json(out / "exports" / "forms.json")


def _x(n=6, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("label", ["finetune", "norm_head", "linear_probe"])
def test_every_switch_gives_the_tasks_merged_outputs(live_run, label):
    exports, forms = live_run
    spec = forms["methods"][label]["live"]
    loader = Loader(exports, 1)
    live = Live().resident(loader, spec)
    x = _x()
    merged = {t: runner(loader.open(f"{label}/{t}.onnx"))(x)[0] for t in spec["tasks"]}
    assert not np.allclose(merged["digits"], merged["digits_neg"])  # the switch has something to show
    for task in ["digits", "digits_neg", "digits", "digits_neg", "digits"]:  # back and forth
        got = live.runner(task)(x)[0]
        np.testing.assert_allclose(got, merged[task], rtol=1e-4, atol=1e-4)


def test_norm_only_tasks_switch_only_their_small_tensors(live_run):
    exports, forms = live_run
    m = forms["methods"]
    # norms folded into the convs (the merged kernels): a norm-trained task's convs differ from the
    # first task's by a scale per output channel, and its file holds only those scales
    norms, tuned = m["norm_head"]["live"], m["finetune"]["live"]
    assert norms["fused_norms"] is True and tuned["fused_norms"] is True
    assert norms["scaled_tensors"] > 0 and tuned["scaled_tensors"] == 0
    assert norms["switched_bytes"] < 0.25 * tuned["switched_bytes"]
    assert m["linear_probe"]["live"]["switched_bytes"] < norms["switched_bytes"]
    for label in m:  # a task file holds exactly the switched tensors (or their scales)
        spec = m[label]["live"]
        tensors = load_file(str(exports / spec["tasks"]["digits"]))
        assert len(tensors) == spec["switched_tensors"]
        assert sum(v.nbytes for v in tensors.values()) == spec["switched_bytes"]
        assert sum(k.endswith(SUFFIX) for k in tensors) == spec["scaled_tensors"]
    # the same kernels as the fine-tuned model's live graph: no norm runs apart
    ops = {label: [n.op_type for n in onnx.load(str(exports / m[label]["live"]["graph"]),
                                                 load_external_data=False).graph.node] for label in ("norm_head", "finetune")}
    assert ops["norm_head"] == ops["finetune"]


def test_with_fuse_norms_never_norms_run_as_depthwise_convs_in_the_blocked_layout(live_run, tmp_path):
    """The memory-first choice: the base convs once, norms as 1x1 depthwise convs (no BatchNorm
    and no layout round trip left in the graph), still each task's merged outputs."""
    from exporters.bundles import export_bundles
    from exporters.forms.live import LiveOptions
    from pipeline.api import load_bundle

    exports, _ = live_run
    bundle = load_bundle(exports.parent / "bundles" / "norm_head").bundle
    export_bundles({"norm_head": bundle}, tmp_path / "exp", forms=["live"], threads=1,
                   options={"live": LiveOptions(fuse_norms="never")}, log=lambda s: None)
    spec = read_json(tmp_path / "exp" / "forms.json")["methods"]["norm_head"]["live"]
    assert spec["fused_norms"] is False and spec["scaled_tensors"] == 0
    ops = [n.op_type for n in onnx.load(str(tmp_path / "exp" / spec["graph"]), load_external_data=False).graph.node]
    assert "BatchNormalization" not in ops and ops.count("ReorderInput") <= 1
    loader = Loader(tmp_path / "exp", 1)
    live, x = Live().resident(loader, spec), _x()
    for task in ["digits_neg", "digits", "digits_neg"]:
        merged = runner(loader.open(f"norm_head/{task}.onnx"))(x)[0]
        np.testing.assert_allclose(live.runner(task)(x)[0], merged, rtol=1e-4, atol=1e-4)


def test_channel_scales_fit_a_blocked_layout_exactly_or_not_at_all():
    """Output channel o of a blocked weight sits at (o // B, ..., o % B): per-channel scaling of
    such a tensor is found with its block size and rebuilt to float32 rounding; a tensor that is
    not a scaled copy of the base (one weight changed) is left whole."""
    rng = np.random.default_rng(0)
    plain = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)  # O, I, kh, kw
    def block(w, b=8):  # onnxruntime's NCHWc filter order: O/B, I/B, kh, kw, Bi, Bo
        o, i, kh, kw = w.shape
        return np.ascontiguousarray(w.reshape(o // b, b, i // b, b, kh, kw).transpose(0, 2, 4, 5, 3, 1)).reshape(w.shape)
    scale = rng.uniform(0.2, 3.0, 32).astype(np.float32)
    tasks = [block(plain), block(plain * scale[:, None, None, None])]
    got = channel_scales.fit(tasks)
    assert got is not None and got[1].shape == (4, 8)
    np.testing.assert_allclose(got[1].reshape(-1), scale, rtol=1e-6)
    assert np.array_equal(got[0], np.ones((4, 8), np.float32))
    out = np.empty_like(tasks[0])
    channel_scales.apply(tasks[0], got[1], out)
    np.testing.assert_allclose(out, tasks[1], rtol=1e-6, atol=1e-7)
    assert channel_scales.fit([plain, plain * scale[:, None, None, None]])[1].shape == (32, 1)  # O-first layout
    touched = tasks[1].copy()
    touched.reshape(-1)[100] *= 1.01
    assert channel_scales.fit([tasks[0], touched]) is None
    assert channel_scales.fit([tasks[0], rng.standard_normal(tasks[0].shape).astype(np.float32)]) is None


def test_norms_as_depthwise_convs_compute_the_same_and_leave_other_norms_alone(tmp_path):
    """Each BatchNorm after a conv becomes a 1x1 depthwise conv with the same outputs; a norm
    whose input is not a conv's output (here the network's input) stays as it is."""
    import onnxruntime as ort
    import torch

    from exporters.forms.live import norms_as_depthwise
    from exporters.onnx import INPUT, OnnxExporter

    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                              torch.nn.ReLU6(), torch.nn.Conv2d(8, 8, 1, bias=False), torch.nn.BatchNorm2d(8))
    gen = torch.Generator().manual_seed(0)
    for bn in (net[0], net[2], net[5]):
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.data = torch.randn(t.shape, generator=gen)
        bn.running_var.data = torch.rand(bn.running_var.shape, generator=gen) + 0.5
    model = onnx.load(str(OnnxExporter(8).export(net.eval(), tmp_path / "net.onnx")))  # as merged graphs are made
    rewritten = norms_as_depthwise(model)
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count("BatchNormalization") == 1 and ops.count("Conv") == 4
    names = {i.name for i in rewritten.graph.initializer}
    assert all(i in names for n in rewritten.graph.node for i in n.input if i != INPUT and i not in
               {o for m in rewritten.graph.node for o in m.output})  # every tensor a node reads is there
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    run = {k: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {INPUT: x})[0]
           for k, m in (("before", model), ("after", rewritten))}
    np.testing.assert_allclose(run["after"], run["before"], rtol=1e-5, atol=1e-5)


def test_a_live_form_built_on_another_cpu_is_refused_naming_both(live_run):
    exports, forms = live_run
    spec = json.loads(json.dumps(forms["methods"]["finetune"]["live"]))
    spec["built_on"]["flags"] = spec["built_on"]["flags"] + ["avx512f_elsewhere"]
    with pytest.raises(FormError, match="optimised for .*avx512f_elsewhere.*rebuild the live form here"):
        Live().resident(Loader(exports, 1), spec)


def test_a_tampered_task_file_is_refused_naming_file_and_tensor(live_run, tmp_path):
    import shutil

    exports, forms = live_run
    copy = tmp_path / "exports"
    shutil.copytree(exports, copy)
    spec = forms["methods"]["norm_head"]["live"]
    path = copy / spec["tasks"]["digits_neg"]
    tensors = load_file(str(path))
    whole = next(k for k in sorted(tensors) if not k.endswith(SUFFIX))
    scales = next(k for k in sorted(tensors) if k.endswith(SUFFIX))  # per-channel scales of a folded conv
    rows, width = tensors[scales].shape
    for name, bad in ((whole, np.zeros(tensors[whole].size + 1, np.float32)), (scales, np.ones((rows + 1, width), np.float32))):
        save_file({**tensors, name: bad}, str(path))
        with pytest.raises(FormError, match=rf"{path.name}: tensor '{name}' .* does not fit"):
            Live().resident(Loader(copy, 1), spec)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(FormError, match=rf"{path.name}: not a readable live-form task file"):
        Live().resident(Loader(copy, 1), spec)


def test_a_task_file_cut_short_is_refused_at_load_or_at_its_switch(live_run, tmp_path):
    """Task tensors are read from their files at each switch: a file whose data ends early is
    refused when the session opens; one cut after it opened fails that switch, naming the file,
    and leaves no mixed state (the next switch to a good task gives its merged outputs)."""
    import shutil

    exports, forms = live_run
    copy = tmp_path / "exports"
    shutil.copytree(exports, copy)
    spec = forms["methods"]["finetune"]["live"]
    path = copy / spec["tasks"]["digits_neg"]
    whole = path.read_bytes()
    path.write_bytes(whole[:-4])
    with pytest.raises(FormError, match=rf"{path.name}: tensor .* past the file's end"):
        Live().resident(Loader(copy, 1), spec)
    path.write_bytes(whole)
    loader = Loader(copy, 1)
    live = Live().resident(loader, spec)
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(FormError, match=rf"{path.name}: tensor .* ends early"):
        live.use("digits_neg")
    x = _x()
    merged = runner(loader.open("finetune/digits.onnx"))(x)[0]
    np.testing.assert_allclose(live.runner("digits")(x)[0], merged, rtol=1e-4, atol=1e-4)
    # a task held as per-channel scales reads its convs' base from the graph's data file at each
    # switch: that file cut after the session opened fails the switch, naming it
    norms = forms["methods"]["norm_head"]["live"]
    assert norms["scaled_tensors"] > 0
    live = Live().resident(loader, norms)
    data = (copy / norms["graph"]).with_suffix(".data")
    kept = data.read_bytes()
    data.write_bytes(kept[: min(offset for offset, _, _ in live.files.base_places.values()) + 4])
    with pytest.raises(FormError, match=rf"{data.name}: tensor .* ends early"):
        live.use("digits_neg")
    data.write_bytes(kept)
    merged = runner(loader.open("norm_head/digits_neg.onnx"))(x)[0]
    np.testing.assert_allclose(live.runner("digits_neg")(x)[0], merged, rtol=1e-4, atol=1e-4)


def test_the_live_form_cannot_run_on_a_gpu_provider(live_run):
    exports, forms = live_run
    spec = forms["methods"]["finetune"]["live"]
    with pytest.raises(FormError, match="cannot run on CUDAExecutionProvider"):
        LiveSession(Loader(exports, 1).path(spec["graph"]), {}, spec["built_on"], 1, ["CUDAExecutionProvider"])


def test_the_graph_holds_no_second_copy_of_the_switched_tensors(live_run):
    exports, forms = live_run
    spec = forms["methods"]["finetune"]["live"]
    # the graph reads them from the first task's file: on disk, K task files and a light graph
    assert (exports / spec["graph"]).stat().st_size < 0.2 * spec["switched_bytes"]
    assert spec["bytes"] < (len(spec["tasks"]) + 0.5) * spec["switched_bytes"]  # not K + 1 copies


def test_a_graph_reading_a_file_outside_its_task_files_is_refused(live_run, tmp_path):
    import shutil

    import onnx

    from exporters.datafiles import set_external

    exports, forms = live_run
    copy = tmp_path / "exports"
    shutil.copytree(exports, copy)
    spec = forms["methods"]["finetune"]["live"]
    graph = copy / spec["graph"]
    model = onnx.load(str(graph), load_external_data=False)
    victim = next(i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL)
    set_external(victim, "../../outside.bin", 0, 4)
    onnx.save_model(model, str(graph))
    with pytest.raises(FormError, match=rf"tensor '{victim.name}' reads '../../outside.bin'"):
        Live().resident(Loader(copy, 1), spec)


def test_tasks_with_heads_of_different_sizes_get_no_live_form_and_the_reason(tmp_path):
    from tests.test_api import colour_folder

    tasks = [{"name": "colour", "source": {"type": "image_folder", "root": str(colour_folder(tmp_path / "data"))},
              "val_size": 9},
             {"name": "digits", "source": {"type": "digits"}, "train_size": 64, "val_size": 16, "test_size": 32}]
    cfg = tiny_config(tmp_path, tasks=tasks, methods=["linear_probe"], export={"forms": ["live"]},
                      train={"epochs": 1, "batch_size": 16, "lr": 0.05})
    out = tmp_path / "run"
    Runner(parse_config(cfg), out, progress=False, log=lambda s: None).run(until="export")
    spec = read_json(out / "exports" / "forms.json")["methods"]["linear_probe"]["live"]
    assert "a live switch only copies float values of one shape" in spec["unavailable"]


def test_the_bound_form_gives_each_tasks_merged_outputs_from_the_live_files(live_run):
    """``bound`` runs the live files with every task's tensors held and bound per task: the same
    outputs as merged on every switch, no files of its own, and the files may change afterwards."""
    from exporters.forms.bound import Bound

    exports, forms = live_run
    for label in ("finetune", "norm_head"):
        live, bound = forms["methods"][label]["live"], forms["methods"][label]["bound"]
        assert bound["files"] == live["files"] and bound["bytes"] == live["bytes"]
        loader = Loader(exports, 1)
        session = Bound().resident(loader, bound)
        x = _x()
        merged = {t: runner(loader.open(f"{label}/{t}.onnx"))(x)[0] for t in bound["tasks"]}
        for task in ["digits", "digits_neg", "digits", "digits_neg"]:
            np.testing.assert_allclose(session.runner(task)(x)[0], merged[task], rtol=1e-4, atol=1e-4)
        held = {k.removesuffix(SUFFIX) for k in load_file(str(exports / live["tasks"]["digits"]))}
        assert set(session.tensors["digits"]) == held  # whole tensors, scaled ones rebuilt


def test_the_bound_form_refuses_what_the_live_form_refuses(live_run, tmp_path):
    import shutil

    from exporters.forms.bound import Bound
    from exporters.live_session import BoundSession

    exports, forms = live_run
    spec = forms["methods"]["finetune"]["bound"]
    other = json.loads(json.dumps(spec))
    other["built_on"]["flags"] = other["built_on"]["flags"] + ["avx512f_elsewhere"]
    with pytest.raises(FormError, match="optimised for .*avx512f_elsewhere"):
        Bound().resident(Loader(exports, 1), other)
    with pytest.raises(FormError, match="cannot run on CUDAExecutionProvider"):
        BoundSession(Loader(exports, 1).path(spec["graph"]), {}, spec["built_on"], 1, ["CUDAExecutionProvider"])
    copy = tmp_path / "exports"
    shutil.copytree(exports, copy)
    path = copy / spec["tasks"]["digits_neg"]
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(FormError, match=rf"{path.name}: tensor .* past the file's end"):
        Bound().resident(Loader(copy, 1), spec)
    # the tensors no task switches are in the graph's own data file, read when the session opens
    norms = forms["methods"]["norm_head"]["bound"]
    data = copy / norms["graph"].replace(".onnx", ".data")
    assert norms["graph"].replace(".onnx", ".data") in norms["files"]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(FormError, match=rf"{data.name}: tensor .* past the file's end"):
        Bound().resident(Loader(copy, 1), norms)
    data.unlink()
    with pytest.raises(FormError, match=rf"{data.name}: cannot read the live graph's tensors"):
        Bound().resident(Loader(copy, 1), norms)


def test_asking_for_the_bound_form_alone_builds_the_live_files_it_runs(tmp_path):
    from exporters.bundles import export_bundles
    from pipeline.api import load_bundle

    cfg = tiny_config(tmp_path, methods=["norm_head"], train={"epochs": 1, "batch_size": 32, "lr": 0.05})
    out = tmp_path / "run"
    Runner(parse_config(cfg), out, progress=False, log=lambda s: None).run(until="fold")
    said = []
    export_bundles({"norm_head": load_bundle(out / "bundles" / "norm_head").bundle}, tmp_path / "exp", forms=["bound"],
                   threads=1, log=said.append)
    forms = read_json(tmp_path / "exp" / "forms.json")["methods"]["norm_head"]
    assert "unavailable" not in forms["bound"] and forms["bound"]["files"] == forms["live"]["files"]
    assert any("also building live" in line for line in said)


def test_a_config_asking_for_bound_gets_live_too(tmp_path):
    """As `taskfold export`: the forms a form is built from come along (bound runs the live files)."""
    cfg = tiny_config(tmp_path, export={"forms": ["bound"]})
    forms = cfg["export"]["forms"]
    assert parse_config(cfg).export.forms == ["bound", "live"]
    assert forms == ["bound"]  # the caller's config is not changed


def test_one_session_forms_spin_alone_and_never_beside_other_sessions(live_run, monkeypatch):
    """A form that serves every task from one session lets its thread pool spin between runs when
    it is alone in a process (the bench's probe, a server); a session per task never does."""
    from exporters import bench
    from exporters.forms import FORMS

    assert {n for n, f in FORMS.items() if f.one_session} == {"switch", "live", "bound", "branch_switch"}
    exports, forms = live_run
    key = "session.intra_op.allow_spinning"

    def spins(sess) -> str:
        return (sess.session if hasattr(sess, "session") else sess).get_session_options().get_session_config_entry(key)

    for name in ("live", "bound"):
        spec = forms["methods"]["finetune"][name]
        assert spins(FORMS[name]().resident(Loader(exports, 1), spec)) == "0"  # the bench's shared process
        assert spins(FORMS[name]().resident(Loader(exports, 1, spinning=True), spec)) == "1"
    assert spins(Loader(exports, 1).open("finetune/digits.onnx")) == "0"
    seen = {}

    def switch_ms(loader, form, *args):
        seen[form] = loader.spinning
        return 1.0

    monkeypatch.setattr(bench, "_resident", lambda *args: (1.0, 1.0, 0.0))
    monkeypatch.setattr(bench, "switch_ms", switch_ms)
    for name in ("merged", "live", "bound"):
        bench._probe(str(exports), name, forms["methods"]["finetune"][name], 16, 1, 1)
    assert seen == {"merged": False, "live": True, "bound": True}
