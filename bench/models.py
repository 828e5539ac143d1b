"""Model packages for the benchmark, written into a temporary models folder.

Besides the shipped reference model (copied as it is), the benchmark runs a radiograph model
of the size of a DenseNet-121 at 224 x 224: the DenseNet-121 topology (dense blocks of
6, 12, 24 and 16 layers, growth rate 32, bottleneck 4x, transitions halving the channels) with
random weights, built with ``onnx.helper``. Batch normalisation is left out (at inference it
folds into the convolutions' weights and bias), so the graph costs what the convolutions cost:
about 2.9 G multiply-accumulates per image. Its output is meaningless; it exists only to make
inference take as long as a real radiograph classifier would. It is never a triage model: it
lives only in the benchmark's temporary folder, with a manifest that says so.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from triage.settings import PROJECT_ROOT

REFERENCE_MODEL = "head-ct-hyperdensity"
# The version of the reference model on trial in the shadow section: the same weights under
# another version and a lower threshold, as a retrained model's candidate would be installed.
TRIAL_VERSION = "2.0.0-trial"
TRIAL_THRESHOLD = 0.05
TRIAL_FOLDER = REFERENCE_MODEL + "-trial"
RADIOGRAPH_MODEL = "bench-densenet121-cr"
SIZE = 224
GROWTH = 32
BLOCKS = (6, 12, 24, 16)
OPSET = 17
IR_VERSION = 8


class _Graph:
    """Accumulates nodes and random initialisers, counting multiply-accumulates."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.macs = 0
        self.n = 0

    def name(self, kind: str) -> str:
        self.n += 1
        return f"{kind}{self.n}"

    def conv(self, x: str, c_in: int, c_out: int, k: int, side: int, stride: int = 1) -> str:
        """Convolution with He-scaled random weights and a bias; ``side`` is the output side."""
        w, b, out = self.name("w"), self.name("b"), self.name("conv")
        scale = np.sqrt(2.0 / (c_in * k * k))
        weights = (self.rng.standard_normal((c_out, c_in, k, k)) * scale).astype(np.float32)
        self.inits += [numpy_helper.from_array(weights, w),
                       numpy_helper.from_array(np.zeros(c_out, np.float32), b)]
        self.nodes.append(helper.make_node("Conv", [x, w, b], [out], kernel_shape=[k, k],
                                           strides=[stride, stride], pads=[k // 2] * 4))
        self.macs += c_in * c_out * k * k * side * side
        return out

    def op(self, kind: str, inputs: list[str], **attrs: object) -> str:
        out = self.name(kind.lower())
        self.nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out


def build_densenet121(seed: int = 121) -> tuple[onnx.ModelProto, int]:
    """DenseNet-121-sized graph ``image`` [N,3,224,224] -> ``probability`` [N,1]; and its MACs."""
    g = _Graph(seed)
    side = SIZE // 2
    x = g.op("Relu", [g.conv("image", 3, 64, 7, side, stride=2)])
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    side //= 2
    channels = 64
    for index, layers in enumerate(BLOCKS):
        features = [x]
        for _ in range(layers):
            joined = features[0] if len(features) == 1 else g.op("Concat", features, axis=1)
            bottleneck = g.op("Relu", [g.conv(g.op("Relu", [joined]), channels, 4 * GROWTH, 1,
                                              side)])
            features.append(g.conv(bottleneck, 4 * GROWTH, GROWTH, 3, side))
            channels += GROWTH
        x = g.op("Concat", features, axis=1)
        if index < len(BLOCKS) - 1:
            x = g.conv(g.op("Relu", [x]), channels, channels // 2, 1, side)
            channels //= 2
            x = g.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
            side //= 2
    pooled = g.op("GlobalAveragePool", [g.op("Relu", [x])])
    flat = g.op("Flatten", [pooled], axis=1)
    fc_w = (g.rng.standard_normal((channels, 1)) / np.sqrt(channels)).astype(np.float32)
    g.inits.append(numpy_helper.from_array(fc_w, "fc_w"))
    g.macs += channels
    # Random weights give large logits; a small scale keeps the probability finite.
    g.inits.append(numpy_helper.from_array(np.array(1e-3, np.float32), "logit_scale"))
    logit = g.op("Mul", [g.op("MatMul", [flat, "fc_w"]), "logit_scale"])
    g.nodes.append(helper.make_node("Sigmoid", [logit], ["probability"]))
    graph = helper.make_graph(
        g.nodes, "bench_densenet121",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION, producer_name="triage bench")
    onnx.checker.check_model(model)
    return model, g.macs


def _radiograph_manifest(sha256: str) -> dict[str, object]:
    return {
        "id": RADIOGRAPH_MODEL,
        "version": "0.0.1",
        "name": "Benchmark DenseNet-121-size CR/DX",
        "manufacturer": "Triage benchmark",
        "description": "Random weights in the DenseNet-121 topology at 224 x 224, generated "
                       "by bench/models.py to load workers as a real radiograph model would.",
        "intended_use": "Benchmarking only. Output is meaningless. Never for clinical use.",
        "regulatory_status": "benchmark-only",
        "onnx_file": "model.onnx",
        "sha256": sha256,
        "applicability": {
            "modalities": ["CR", "DX"],
            "sop_class_uids": ["1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1",
                               "1.2.840.10008.5.1.4.1.1.1.1.1"],
        },
        "preprocessing": {"input": "image", "size": SIZE, "rescale": "raw",
                          "normalisation": "minmax", "channels": 3},
        "outputs": [{
            "label": "benchmark-finding", "output": "probability", "index": 0,
            "concept": {"code_value": "BENCH001", "scheme_designator": "99TRIAGEBENCH",
                        "code_meaning": "Benchmark output (meaningless)"},
            # Never reached: the benchmark should not reorder its own worklist.
            "threshold": 1.0, "priority": "urgent",
        }],
        "runtime": {"threads": 1, "batch_size": 1},
    }


def write_models(folder: Path) -> dict[str, object]:
    """Fill ``folder`` with the reference model and the radiograph model; returns facts
    about them for the results (model ids, the radiograph model's MACs and size)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(PROJECT_ROOT / "models" / REFERENCE_MODEL, folder / REFERENCE_MODEL,
                    dirs_exist_ok=True)
    model, macs = build_densenet121()
    data = model.SerializeToString()
    package = folder / RADIOGRAPH_MODEL
    package.mkdir(exist_ok=True)
    (package / "model.onnx").write_bytes(data)
    manifest = _radiograph_manifest(hashlib.sha256(data).hexdigest())
    (package / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return {"reference_model": REFERENCE_MODEL, "radiograph_model": RADIOGRAPH_MODEL,
            "radiograph_model_gmacs": round(macs / 1e9, 3),
            "radiograph_model_megabytes": round(len(data) / 2**20, 1)}


def write_trial_model(folder: Path) -> tuple[str, str, str]:
    """Install beside the reference model a second version of it (``TRIAL_VERSION``, its
    threshold ``TRIAL_THRESHOLD``); returns (model id, installed version, trial version)."""
    package = folder / TRIAL_FOLDER
    shutil.copytree(PROJECT_ROOT / "models" / REFERENCE_MODEL, package, dirs_exist_ok=True)
    manifest = yaml.safe_load((package / "manifest.yaml").read_text())
    installed = str(manifest["version"])
    manifest["version"] = TRIAL_VERSION
    for output in manifest["outputs"]:
        output["threshold"] = TRIAL_THRESHOLD
    (package / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return REFERENCE_MODEL, installed, TRIAL_VERSION
