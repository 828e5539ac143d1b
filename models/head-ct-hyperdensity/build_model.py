"""Build ``model.onnx`` of the head-CT hyperdensity reference model, reproducibly.

The model is a fixed, explainable rule written as an ONNX graph (no training, no weights from
elsewhere). Per axial slice of Hounsfield units it computes:

1. skull: pixels above ``BONE_HU``; the head holder and table stay below it;
2. enclosed: pixels with skull somewhere to their left, right, front and back (four cumulative
   sums), which for a roughly convex skull is the cranial cavity;
3. intracranial: enclosed soft tissue (``SOFT_HU``), at least ``RIM_PX`` pixels away from the
   skull so that partial-volume bone at the inner table is not mistaken for blood;
4. hyperdense: intracranial pixels in the range of acute blood (``BLOOD_HU``);
5. clusters: hyperdense pixels whose ``POOL_PX`` x ``POOL_PX`` neighbourhood is at least
   ``DENSITY`` hyperdense, which drops image noise and thin structures (falx, vessels);
6. fraction: cluster area over intracranial area (at least ``MIN_AREA_PX``, so tiny cavities
   at the vertex or skull base do not inflate it);
7. probability: ``sigmoid(GAIN * (fraction - MIDPOINT))``.

Running this script twice gives byte-identical files: the graph has no random parts and no
time stamps, and the IR version and opset are pinned.

Usage: ``python build_model.py [OUTPUT]`` (default: ``model.onnx`` beside this file); prints the
SHA-256 to put in ``manifest.yaml``.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZE = 256
OPSET = 17
IR_VERSION = 8

BONE_HU = 500.0
DENSE_HU = 150.0
AIR_HU = -200.0
SOFT_HU = (0.0, 100.0)
BLOOD_HU = (50.0, 90.0)
RIM_PX = 3
POOL_PX = 5
DENSITY = 0.6
MIN_AREA_PX = 6000.0
MIDPOINT = 0.002
GAIN = 2500.0


def _const(name: str, value: float | int | list[int]) -> onnx.TensorProto:
    dtype = np.float32 if isinstance(value, float) else np.int64
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def _in_range(nodes: list[onnx.NodeProto], x: str, low: str, high: str, out: str) -> None:
    """``out = float(low <= x <= high)``."""
    nodes += [
        helper.make_node("GreaterOrEqual", [x, low], [f"{out}_ge"]),
        helper.make_node("LessOrEqual", [x, high], [f"{out}_le"]),
        helper.make_node("And", [f"{out}_ge", f"{out}_le"], [f"{out}_b"]),
        helper.make_node("Cast", [f"{out}_b"], [out], to=TensorProto.FLOAT),
    ]


def _enclosed(nodes: list[onnx.NodeProto], bone: str, out: str) -> None:
    """``out = 1`` where ``bone`` occurs on both sides along both image axes."""
    sides = []
    for axis in (2, 3):
        for reverse in (0, 1):
            side = f"{out}_{axis}{reverse}"
            nodes += [
                helper.make_node("CumSum", [bone, f"axis{axis}"], [f"{side}_sum"], reverse=reverse),
                helper.make_node("Greater", [f"{side}_sum", "zero"], [side]),
            ]
            sides.append(side)
    nodes += [
        helper.make_node("And", sides[:2], [f"{out}_a"]),
        helper.make_node("And", sides[2:], [f"{out}_b"]),
        helper.make_node("And", [f"{out}_a", f"{out}_b"], [f"{out}_ab"]),
        helper.make_node("Cast", [f"{out}_ab"], [out], to=TensorProto.FLOAT),
    ]


def build() -> onnx.ModelProto:
    """The hyperdensity graph: ``hu`` float32 [N,1,SIZE,SIZE] -> ``probability`` float32 [N,1]."""
    rim = 2 * RIM_PX + 1
    half = POOL_PX // 2
    initializers = [
        _const("zero", 0.0),
        _const("one", 1.0),
        _const("bone_hu", BONE_HU),
        _const("dense_hu", DENSE_HU),
        _const("air_hu", AIR_HU),
        _const("soft_lo", SOFT_HU[0]),
        _const("soft_hi", SOFT_HU[1]),
        _const("blood_lo", BLOOD_HU[0]),
        _const("blood_hi", BLOOD_HU[1]),
        _const("density", DENSITY),
        _const("min_area", MIN_AREA_PX),
        _const("midpoint", MIDPOINT),
        _const("gain", GAIN),
        _const("axis2", 2),
        _const("axis3", 3),
        _const("hw_axes", [2, 3]),
    ]
    nodes: list[onnx.NodeProto] = [
        helper.make_node("Greater", ["hu", "bone_hu"], ["bone_b"]),
        helper.make_node("Cast", ["bone_b"], ["bone"], to=TensorProto.FLOAT),
    ]
    _enclosed(nodes, "bone", "enclosed")
    nodes += [
        # Dilating skull and air by RIM_PX pixels keeps partial-volume bone and the mucosa of
        # the paranasal sinuses and mastoid cells out of the cavity.
        helper.make_node("Less", ["hu", "air_hu"], ["air_b"]),
        helper.make_node("Cast", ["air_b"], ["air"], to=TensorProto.FLOAT),
        helper.make_node("Greater", ["hu", "dense_hu"], ["dense_b"]),
        helper.make_node("Cast", ["dense_b"], ["dense"], to=TensorProto.FLOAT),
        helper.make_node("Max", ["dense", "air"], ["dense_or_air"]),
        helper.make_node(
            "MaxPool", ["dense_or_air"], ["rim"], kernel_shape=[rim, rim], pads=[RIM_PX] * 4
        ),
        helper.make_node("Sub", ["one", "rim"], ["away_from_rim"]),
    ]
    _in_range(nodes, "hu", "soft_lo", "soft_hi", "soft")
    _in_range(nodes, "hu", "blood_lo", "blood_hi", "blood")
    nodes += [
        helper.make_node("Mul", ["enclosed", "away_from_rim"], ["cavity"]),
        helper.make_node("Mul", ["cavity", "soft"], ["intracranial"]),
        helper.make_node("Mul", ["intracranial", "blood"], ["hyperdense"]),
        helper.make_node(
            "AveragePool",
            ["hyperdense"],
            ["local_density"],
            kernel_shape=[POOL_PX, POOL_PX],
            pads=[half] * 4,
            count_include_pad=1,
        ),
        helper.make_node("GreaterOrEqual", ["local_density", "density"], ["compact_b"]),
        helper.make_node("Cast", ["compact_b"], ["compact"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["compact", "hyperdense"], ["cluster"]),
        helper.make_node("ReduceSum", ["cluster", "hw_axes"], ["cluster_area4"], keepdims=1),
        helper.make_node("ReduceSum", ["intracranial", "hw_axes"], ["ic_area4"], keepdims=1),
        helper.make_node("Max", ["ic_area4", "min_area"], ["ic_area_floor"]),
        helper.make_node("Div", ["cluster_area4", "ic_area_floor"], ["fraction4"]),
        helper.make_node("Sub", ["fraction4", "midpoint"], ["excess"]),
        helper.make_node("Mul", ["excess", "gain"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["probability4"]),
        helper.make_node("Squeeze", ["probability4", "hw_axes"], ["probability"]),
    ]
    graph = helper.make_graph(
        nodes,
        "head_ct_hyperdensity",
        [helper.make_tensor_value_info("hu", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1])],
        initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="triage build_model.py",
        producer_version="1",
        doc_string="Research use only. Fraction of intracranial pixels in compact clusters "
        f"of {BLOOD_HU[0]:g}-{BLOOD_HU[1]:g} HU, mapped through a logistic.",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv: list[str]) -> None:
    output = Path(argv[1]) if len(argv) > 1 else Path(__file__).with_name("model.onnx")
    data = build().SerializeToString(deterministic=True)
    output.write_bytes(data)
    print(f"{output}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main(sys.argv)
