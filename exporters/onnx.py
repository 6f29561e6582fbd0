"""Merged per-task ONNX models from a bundle, with parity against torch.

``torch.onnx.export(..., dynamo=True, optimize=False)`` traces one model per architecture
(input size, head shape); every further task of that shape reuses the trace through
``ONNXProgram.apply_weights`` (about 0.1 s instead of ~9 s per task). ``optimize=False``
keeps every weight a named initializer so the swap is complete. A model that is a traced
architecture with some modules replaced by identities (AdaShare's skipped blocks) reuses that
trace too, with those modules cut out of the graph (``exporters.identities``).

Each file written is then constant-folded (``fold_constants``): the exporter emits conv biases
and clip bounds as Expand/CastLike subgraphs, and onnxruntime fuses BatchNorm and the
activation into a conv only when those are constants. Unfolded, EfficientNet-Lite0 ran about
4x slower. BatchNorm stays a separate node, its tensors named initializers, so a task whose
norms alone differ still shares every conv weight with the base (the shared and switch
forms); onnxruntime folds it when the session loads. Parity is checked for every file written.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import torch

from exporters.identities import NotRemovable, without_modules
from pipeline.core.compare import compare_logits, model_logits
from pipeline.core.errors import TaskfoldError
from pipeline.core.io import atomic_path

INPUT, OUTPUT = "images", "logits"
# bumped when the files exported from the same bundle change (2: constant-folded graphs, the
# INT8 recipe), so existing run directories re-export without retraining
EXPORT_FORMAT = 2


class OnnxExportError(TaskfoldError, RuntimeError):
    """The torch model could not be exported (an op the exporter does not know); names the model."""


def strip_debug(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the exporter's per-node debug metadata (stack traces, FX node names, local paths):
    about 1 MB per EfficientNet-Lite0 graph, which onnxruntime never reads."""
    g = model.graph
    for n in g.node:
        del n.metadata_props[:]
        n.doc_string = ""
    for v in (*g.value_info, *g.input, *g.output, *g.initializer):
        del v.metadata_props[:]
    return model


def base_model(features: torch.nn.Module, num_features: int, num_classes: int) -> torch.nn.Module:
    """The base as a plain model for timing and sharing: ``features`` and a zero head. Every
    base graph gets the same head, so two bases differ only where their backbones do."""
    from pipeline.core.backbones import TaskNet

    head = torch.nn.Linear(num_features, num_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return TaskNet(features, head).eval()


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every constant-computable subgraph evaluated and the results stored as
    initializers. Weights used as they are keep their names; a Linear weight the graph
    transposes is stored transposed (the forms match tensors by content, not name)."""
    import onnx_ir as ir
    import onnx_ir.passes.common as passes
    import onnxscript.optimizer

    graph = ir.serde.deserialize_model(model)
    onnxscript.optimizer.fold_constants(graph)
    _drop_zero_conv_biases(graph)
    passes.RemoveUnusedNodesPass()(graph)  # also the initializers nothing reads any more
    passes.LiftConstantsToInitializersPass()(graph)  # tensors of more than 16 values; shape constants stay nodes
    return ir.serde.serialize_model(graph)


def _drop_zero_conv_biases(model) -> None:
    """A conv without a bias gets an all-zero one from the exporter. Folded, those are the same
    tensors in every graph, so the shared forms would point every task into the base's weight
    file for a few KB of zeros; a missing bias means the same and stores nothing."""
    for node in model.graph.all_nodes():
        if node.op_type == "Conv" and len(node.inputs) == 3 and node.inputs[2] is not None:
            bias = node.inputs[2].const_value
            if bias is not None and not bias.numpy().any():
                node.resize_inputs(2)


def _quiet():
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"torch\.onnx.*")
    warnings.filterwarnings("ignore", module=r"onnxscript.*")


class OnnxExporter:
    """Exports TaskNets to ONNX files; reuses one trace per architecture signature, and the
    trace of a full architecture for a model of it with some modules replaced by identities
    (AdaShare's skipped blocks; ``exporters.identities``)."""

    def __init__(self, image_size: int, opset: int = 18):
        self.image_size = image_size
        self.opset = opset
        self._programs: dict[tuple, object] = {}
        self._modules: dict[tuple, dict[str, str]] = {}  # signature -> {module path: class name}
        self.traces = 0

    @staticmethod
    def signature(model: torch.nn.Module) -> tuple:
        return tuple((k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items())

    @staticmethod
    def module_types(model: torch.nn.Module) -> dict[str, str]:
        return {p: type(m).__name__ for p, m in model.named_modules()}

    def _traced_with_identities(self, model: torch.nn.Module, sig: tuple) -> tuple[tuple, list[str]] | None:
        """A traced architecture that ``model`` (signature ``sig``) is, but for modules it replaced
        by identities: (the traced signature, those module paths), or None."""
        modules = self.module_types(model)
        identities = [p for p, name in modules.items() if p and name == "Identity"]
        if not identities:
            return None
        entries = {k: rest for k, *rest in sig}
        for traced_sig, traced in self._modules.items():
            removed = [p for p in identities if traced.get(p, "Identity") != "Identity"]
            if not removed:
                continue
            def kept(path: str) -> bool:
                return not any(path == r or path.startswith(f"{r}.") for r in removed)
            if ({k: rest for k, *rest in traced_sig if kept(k)} == entries
                    and {p: n for p, n in traced.items() if kept(p)} == {p: n for p, n in modules.items() if kept(p)}):
                return traced_sig, removed
        return None

    def _trace(self, model: torch.nn.Module, sig: tuple):
        example = torch.zeros(2, 3, self.image_size, self.image_size)
        try:
            program = torch.onnx.export(
                model, (example,), dynamo=True, optimize=False, opset_version=self.opset, verbose=False,
                input_names=[INPUT], output_names=[OUTPUT],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            )
        except Exception as err:
            raise OnnxExportError(f"ONNX export of {type(model).__name__} failed: {err}") from err
        self._programs[sig] = program
        self._modules[sig] = self.module_types(model)
        self.traces += 1
        return program

    def export(self, model: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> Path:
        """Write ``model`` (eval mode, dynamic batch) to ``path`` atomically, one self-contained file,
        with ``metadata`` as the model's metadata properties."""
        _quiet()
        model = model.eval()
        sig = self.signature(model)
        program, removed = self._programs.get(sig), []
        if program is None and (found := self._traced_with_identities(model, sig)):
            program, removed = self._programs[found[0]], found[1]
        proto = None
        if program is not None:
            program.apply_weights({k: v.detach() for k, v in model.state_dict().items()})
            proto = program.model_proto
            if removed:
                try:
                    proto = without_modules(proto, removed)
                except NotRemovable:  # not a one-in, one-out piece of the graph: trace this architecture
                    proto = None
        if proto is None:
            proto = self._trace(model, sig).model_proto
        proto = strip_debug(fold_constants(proto))
        if metadata:
            onnx.helper.set_model_props(proto, metadata)
        with atomic_path(Path(path)) as tmp:
            onnx.save_model(proto, str(tmp))
        return Path(path)


@torch.no_grad()
def parity(model: torch.nn.Module, sess, batches: Iterable, batch_size: int = 64) -> dict[str, float]:
    """Run torch and onnxruntime on the same (normalised) image batches: max abs diff, argmax
    agreement. ``batches``: numpy or torch batches, or one tensor cut into ``batch_size`` batches."""
    from exporters.latency import runner

    if isinstance(batches, (torch.Tensor, np.ndarray)):
        batches = [batches[i : i + batch_size] for i in range(0, len(batches), batch_size)]
    fn = runner(sess)
    ref, got = [], []
    for x in batches:
        x = np.ascontiguousarray(x, dtype=np.float32)
        ref.append(model_logits(model, torch.from_numpy(x)).numpy())
        got.append(fn(x)[0])
    return compare_logits(np.concatenate(ref), np.concatenate(got))
