"""ONNX export of merged models: onnxruntime matches torch, trace reuse is exact."""
from __future__ import annotations

import onnx
import pytest
import torch

from exporters.latency import measure
from exporters.onnx import OnnxExporter, parity
from exporters.runtime import session


def _trained_like(bb, seed):
    model = bb.task_net(10, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
                m.running_var.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.mark.parametrize("bb_name", ["tiny_convnet", "tiny_vit"])
def test_onnx_matches_torch_and_reuses_one_trace(tmp_path, backbones, digits16, bb_name):
    bb, size = backbones[bb_name]
    exporter = OnnxExporter(size)
    x = digits16.test.inputs()
    for seed in (1, 2):  # the second model goes through apply_weights on the first trace
        model = _trained_like(bb, seed)
        path = exporter.export(model, tmp_path / f"m{seed}.onnx")
        check = parity(model, session(path, threads=1), x, batch_size=7)  # odd batch: dynamic axis
        assert check["max_abs_diff"] < 1e-4, check
        assert check["argmax_agree"] == 1.0
        assert check["images"] == len(x)
    assert exporter.traces == 1
    assert (tmp_path / "m1.onnx").read_bytes() != (tmp_path / "m2.onnx").read_bytes()


@pytest.mark.parametrize("bb_name", ["efficientnet_lite0", "tiny_vit"])
def test_exported_graphs_have_nothing_left_to_fold(tmp_path, backbones, bb_name):
    """Constant subgraphs (the exporter's Expand/CastLike conv biases and clip bounds) block
    onnxruntime's conv fusions; every file is written folded, its conv weights still named."""
    bb, size = backbones[bb_name]
    model = _trained_like(bb, 1)
    graph = onnx.load(str(OnnxExporter(size).export(model, tmp_path / "m.onnx"))).graph
    constant = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    foldable = [n.op_type for n in graph.node if n.op_type != "Constant" and n.input and set(n.input) <= constant]
    assert not foldable, foldable
    values = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    zero_biases = [n.name for n in graph.node if n.op_type == "Conv" and len(n.input) == 3 and not values[n.input[2]].any()]
    assert not zero_biases  # the same zeros in every graph would tie each task to the base's weight file
    convs = {k for k, v in model.state_dict().items() if v.dim() == 4}  # Linear weights are stored transposed
    assert convs <= {i.name for i in graph.initializer}


def test_a_new_head_shape_gets_its_own_trace(tmp_path, backbones, digits16):
    bb, size = backbones["tiny_convnet"]
    exporter = OnnxExporter(size)
    exporter.export(bb.task_net(10).eval(), tmp_path / "a.onnx")
    five = bb.task_net(5).eval()
    path = exporter.export(five, tmp_path / "b.onnx")
    assert exporter.traces == 2
    out = session(path).run(None, {"images": digits16.test.inputs(3).numpy()})[0]
    assert out.shape == (3, 5)


def test_latency_measure_reports_every_session(tmp_path, backbones):
    bb, size = backbones["tiny_convnet"]
    exporter = OnnxExporter(size)
    p = exporter.export(bb.task_net(10).eval(), tmp_path / "a.onnx")
    res = measure({"a": session(p, 1), "b": session(p, 1)}, size, batch_size=2, warmup=1, runs=10)
    assert set(res) == {"a", "b"}
    for r in res.values():
        assert r["runs"] == 10 and 0 < r["median_ms"] <= r["p90_ms"]


def _skipping(model: torch.nn.Module, paths: list[str]) -> torch.nn.Module:
    """``model`` with the modules at ``paths`` (under ``features``) replaced as AdaShare's Skip does."""
    for p in paths:
        parent, _, name = f"features.{p}".rpartition(".")
        setattr(model.get_submodule(parent), name, torch.nn.Identity())
    return model


@pytest.mark.parametrize("bb_name", ["tiny_convnet", "efficientnet_lite0"])
def test_models_that_skip_blocks_reuse_the_full_trace_with_the_blocks_cut_out(tmp_path, backbones, bb_name):
    from pipeline.core.blocks import skippable_blocks

    bb, size = backbones[bb_name]
    blocks = skippable_blocks(bb.features, size)
    exporter = OnnxExporter(size)
    full = onnx.load(str(exporter.export(_trained_like(bb, 1), tmp_path / "full.onnx"))).graph
    x = torch.randn(9, 3, size, size, generator=torch.Generator().manual_seed(0))
    for k, skip in enumerate([blocks[:1], blocks[-1:], blocks]):
        model = _skipping(_trained_like(bb, 2 + k), skip)
        path = exporter.export(model, tmp_path / f"skip{k}.onnx")
        check = parity(model, session(path, threads=1), x, batch_size=4)
        assert check["max_abs_diff"] < 1e-4 and check["argmax_agree"] == 1.0, (skip, check)
        graph = onnx.load(str(path)).graph
        cut = sum(isinstance(m, torch.nn.Conv2d) for p in skip for m in bb.features.get_submodule(p).modules())
        assert sum(n.op_type == "Conv" for n in graph.node) == sum(n.op_type == "Conv" for n in full.node) - cut > 0
        names = {i.name for i in graph.initializer}
        assert not any(n.startswith(f"features.{p}.") for p in skip for n in names)  # their weights are gone too
    assert exporter.traces == 1


def test_an_identity_that_is_not_a_one_in_one_out_piece_is_traced_anew(tmp_path, backbones):
    bb, size = backbones["tiny_convnet"]
    exporter = OnnxExporter(size)
    exporter.export(_trained_like(bb, 1), tmp_path / "full.onnx")
    model = _trained_like(bb, 2)
    model.head = torch.nn.Identity()  # its nodes give the graph's output: nothing to read it from
    path = exporter.export(model, tmp_path / "features.onnx")
    assert exporter.traces == 2
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    check = parity(model, session(path, threads=1), x)
    assert check["max_abs_diff"] < 1e-4
