"""Small ONNX face models for the tests, built with the ``onnx`` package and run by the real insightface code.

insightface's packs (buffalo_l, antelopev2) cannot be downloaded here, so a test pack holds:

* a detector with SCRFD's signature (one NCHW input of any size; nine outputs: scores, box
  distances and keypoint distances for strides 8, 16 and 32, two anchors per cell), which
  insightface's model router takes for SCRFD. Its faces are given in units of the picture's long
  side; the graph reads the input's size and places each face on the stride-8 anchor nearest its
  centre, so every detection size finds the faces where they are in the picture. A face wider
  than ``max_face_px`` detector pixels is not found (as real SCRFD misses a face that fills the
  picture at 640), and a cell with no texture (a flat picture) finds nothing.
* a recognizer with ArcFace's signature (1x3x112x112 -> 512): 8x8 average pooling of the
  normalised pixels and a fixed random linear map, so the embedding depends on the aligned face.
  ``reference_embedding`` computes the same thing with numpy, independently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

# insightface's ArcFace landmark template at 112 (the published five-point reference)
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
STRIDES = (8, 16, 32)
ANCHORS = 2


@dataclass(frozen=True)
class TargetFace:
    """A face placed by a similarity transform of the ArcFace template: the template's 112x112
    square, centred on (cx, cy), is ``size`` pixels wide and turned by ``angle`` degrees."""

    cx: float
    cy: float
    size: float
    angle: float = 0.0
    score: float = 0.9

    def template_to_picture(self) -> np.ndarray:
        """2x3 matrix taking template (crop) pixels to picture pixels."""
        s = self.size / 112.0
        a = np.deg2rad(self.angle)
        r = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        t = np.array([self.cx, self.cy]) - r @ np.array([56.0, 56.0])
        return np.hstack([r, t[:, None]])

    def picture_to_crop(self, crop_size: int) -> np.ndarray:
        """2x3 matrix taking picture pixels to a ``crop_size`` aligned crop (what norm_crop should use)."""
        m = np.vstack([self.template_to_picture(), [0, 0, 1]])
        scale_crop = np.diag([crop_size / 112.0, crop_size / 112.0, 1.0])
        return (scale_crop @ np.linalg.inv(m))[:2]

    def keypoints(self) -> np.ndarray:
        m = self.template_to_picture()
        return ARCFACE_TEMPLATE @ m[:, :2].T + m[:, 2]

    def box(self) -> Tuple[float, float, float, float]:
        h = self.size / 2.0
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


def _helpers():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    return onnx, TensorProto, helper, numpy_helper


class _Graph:
    """A tiny graph builder: unique names, constants, nodes."""

    def __init__(self):
        self.onnx, self.TensorProto, self.helper, self.numpy_helper = _helpers()
        self.nodes = []
        self.inits = []
        self.n = 0

    def name(self, hint):
        self.n += 1
        return f"{hint}_{self.n}"

    def const(self, value, dtype=np.float32, hint="c"):
        name = self.name(hint)
        self.inits.append(self.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type, inputs, hint=None, **attrs):
        out = self.name(hint or op_type.lower())
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out


def _stride_outputs(g: _Graph, x, size_f, faces_unit, kps_unit, conf, stride, fires, max_face_px):
    """(scores [N,1], boxes [N,4], kps [N,10]) for one stride, N = cells * ANCHORS in (y, x, anchor) order."""
    shape = g.op("Shape", [x])
    hw = g.op("Gather", [shape, g.const([2, 3], np.int64)], axis=0)
    cells = g.op("Div", [hw, g.const([stride, stride], np.int64)])  # [gh, gw]
    gh = g.op("Gather", [cells, g.const(0, np.int64)], axis=0)
    gw = g.op("Gather", [cells, g.const(1, np.int64)], axis=0)
    zero, one = g.const(0, np.int64), g.const(1, np.int64)
    ys = g.op("Cast", [g.op("Range", [zero, gh, one])], to=g.TensorProto.FLOAT)
    xs = g.op("Cast", [g.op("Range", [zero, gw, one])], to=g.TensorProto.FLOAT)
    s = g.const(float(stride))
    grid_shape = g.op("Concat", [g.op("Unsqueeze", [gh, g.const([0], np.int64)]),
                                 g.op("Unsqueeze", [gw, g.const([0], np.int64)])], axis=0)
    ax = g.op("Expand", [g.op("Unsqueeze", [g.op("Mul", [xs, s]), g.const([0], np.int64)]), grid_shape])
    ay = g.op("Expand", [g.op("Unsqueeze", [g.op("Mul", [ys, s]), g.const([1], np.int64)]), grid_shape])

    def per_anchor(t):  # [gh, gw] -> [gh*gw*ANCHORS, 1], each cell repeated for its anchors
        flat = g.op("Reshape", [t, g.const([-1, 1], np.int64)])
        return g.op("Reshape", [g.op("Tile", [flat, g.const([1, ANCHORS], np.int64)]), g.const([-1, 1], np.int64)])

    ax, ay = per_anchor(ax), per_anchor(ay)  # [N, 1]
    # texture gate: the local variance of the cell's pixels (a flat picture has no face)
    pooled = g.op("AveragePool", [x], kernel_shape=[stride, stride], strides=[stride, stride])
    pooled_sq = g.op("AveragePool", [g.op("Mul", [x, x])], kernel_shape=[stride, stride], strides=[stride, stride])
    var = g.op("ReduceSum", [g.op("Sub", [pooled_sq, g.op("Mul", [pooled, pooled])]), g.const([0, 1], np.int64)],
               keepdims=0)  # [gh, gw]
    gate = per_anchor(g.op("Cast", [g.op("Greater", [var, g.const(1e-5)])], to=g.TensorProto.FLOAT))

    faces_px = g.op("Mul", [g.const(faces_unit), size_f])  # [F, 4] x0, y0, x1, y1
    kps_px = g.op("Mul", [g.const(kps_unit), size_f])  # [F, 10]
    cx = g.op("Div", [g.op("Add", [g.op("Gather", [faces_px, g.const(0, np.int64)], axis=1),
                                   g.op("Gather", [faces_px, g.const(2, np.int64)], axis=1)]), g.const(2.0)])
    cy = g.op("Div", [g.op("Add", [g.op("Gather", [faces_px, g.const(1, np.int64)], axis=1),
                                   g.op("Gather", [faces_px, g.const(3, np.int64)], axis=1)]), g.const(2.0)])
    width = g.op("Sub", [g.op("Gather", [faces_px, g.const(2, np.int64)], axis=1),
                         g.op("Gather", [faces_px, g.const(0, np.int64)], axis=1)])  # [F]
    half = g.const(stride / 2.0)
    near_x = g.op("LessOrEqual", [g.op("Abs", [g.op("Sub", [ax, cx])]), half])  # [N, F]
    near_y = g.op("LessOrEqual", [g.op("Abs", [g.op("Sub", [ay, cy])]), half])
    claim = g.op("Cast", [g.op("And", [near_x, near_y])], to=g.TensorProto.FLOAT)  # [N, F]
    fits = g.op("Cast", [g.op("LessOrEqual", [width, g.const(float(max_face_px))])], to=g.TensorProto.FLOAT)
    strength = g.op("Mul", [g.op("Mul", [claim, fits]), g.const(conf if fires else np.zeros_like(conf))])
    score = g.op("Mul", [g.op("ReduceMax", [strength], axes=[1], keepdims=1), gate])  # [N, 1]

    claim3 = g.op("Unsqueeze", [claim, g.const([2], np.int64)])  # [N, F, 1]
    anchor2 = g.op("Concat", [ax, ay], axis=1)  # [N, 2]
    anchor4 = g.op("Unsqueeze", [g.op("Concat", [anchor2, anchor2], axis=1), g.const([1], np.int64)])  # [N,1,4]
    sign = g.const([1.0, 1.0, -1.0, -1.0])
    dist = g.op("Div", [g.op("Mul", [g.op("Sub", [anchor4, faces_px]), sign]), s])  # [N, F, 4]
    boxes = g.op("ReduceSum", [g.op("Mul", [dist, claim3]), g.const([1], np.int64)], keepdims=0)
    anchor10 = g.op("Unsqueeze", [g.op("Concat", [anchor2] * 5, axis=1), g.const([1], np.int64)])
    kdist = g.op("Div", [g.op("Sub", [kps_px, anchor10]), s])  # [N, F, 10]
    kps = g.op("ReduceSum", [g.op("Mul", [kdist, claim3]), g.const([1], np.int64)], keepdims=0)
    return score, boxes, kps


def write_detector(path: str, faces: Sequence[TargetFace], long_side: float, max_face_px: float = 400.0) -> str:
    """An SCRFD-shaped detector finding ``faces`` (picture pixels of a picture whose long side is ``long_side``)."""
    g = _Graph()
    onnx, TensorProto, helper = g.onnx, g.TensorProto, g.helper
    faces_unit = np.array([f.box() for f in faces], dtype=np.float32).reshape(-1, 4) / long_side
    kps_unit = np.array([f.keypoints().reshape(-1) for f in faces], dtype=np.float32).reshape(-1, 10) / long_side
    conf = np.array([f.score for f in faces], dtype=np.float32).reshape(1, -1)
    x = "input.1"
    # the detector input is square and the picture's long side fills it
    size_f = g.op("Cast", [g.op("Gather", [g.op("Shape", [x]), g.const(3, np.int64)], axis=0)], to=TensorProto.FLOAT)
    per_stride = [_stride_outputs(g, x, size_f, faces_unit, kps_unit, conf, s, s == 8, max_face_px) for s in STRIDES]
    names = []
    for kind in range(3):  # insightface reads scores, then boxes, then keypoints, each for strides 8, 16, 32
        for i, stride in enumerate(STRIDES):
            out = g.op("Identity", [per_stride[i][kind]], hint=f"{('score', 'bbox', 'kps')[kind]}_{stride}")
            names.append(out)
    widths = (1, 4, 10)
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [f"n{STRIDES[i % 3]}", widths[i // 3]])
               for i, n in enumerate(names)]
    graph = helper.make_graph(g.nodes, "test_scrfd", [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 3, "h", "w"])],
                              outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def recognizer_weights(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3 * 14 * 14, 512)).astype(np.float32) / 24.0


def write_recognizer(path: str, seed: int = 0) -> str:
    """An ArcFace-shaped recognizer: 8x8 average pooling, flatten, a fixed random 588x512 map."""
    g = _Graph()
    onnx, TensorProto, helper = g.onnx, g.TensorProto, g.helper
    x = "data"
    # no node named Sub/Mul first: insightface then feeds (pixel - 127.5) / 127.5, as for its ArcFace ONNX files
    pooled = g.op("AveragePool", [x], hint="pool", kernel_shape=[8, 8], strides=[8, 8])
    flat = g.op("Flatten", [pooled], hint="flatten", axis=1)
    out = g.op("MatMul", [flat, g.const(recognizer_weights(seed), hint="proj_w")], hint="fc1")
    graph = helper.make_graph(g.nodes, "test_arcface", [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["None", 3, 112, 112])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["None", 512])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def reference_embedding(crop_rgb: np.ndarray, seed: int = 0) -> np.ndarray:
    """The recognizer's output for a 112x112 RGB uint8 crop, computed with numpy."""
    x = (crop_rgb.astype(np.float32) - 127.5) / 127.5  # HWC RGB
    pooled = x.reshape(14, 8, 14, 8, 3).mean(axis=(1, 3))  # [14, 14, 3]
    return pooled.transpose(2, 0, 1).reshape(-1) @ recognizer_weights(seed)


def write_pack(folder: str, faces: Sequence[TargetFace], long_side: float, *, max_face_px: float = 400.0,
               det_name: str = "det_10g.onnx", rec_name: str = "w600k_r50.onnx", seed: int = 0) -> str:
    """A pack folder as insightface lays one out (detector and recognizer ``.onnx`` side by side)."""
    os.makedirs(folder, exist_ok=True)
    write_detector(os.path.join(folder, det_name), faces, long_side, max_face_px)
    write_recognizer(os.path.join(folder, rec_name), seed)
    return folder


def write_antelopev2_pack(folder: str, faces: Sequence[TargetFace], long_side: float, **kw) -> str:
    """A pack with antelopev2's file names (InstantID's pack): SCRFD-10G and the Glint360K ArcFace."""
    return write_pack(folder, faces, long_side, det_name="scrfd_10g_bnkps.onnx", rec_name="glintr100.onnx", **kw)


def insightface_image(name: str) -> str:
    """Path of a photo shipped in insightface's wheel (``t1.jpg``: a group; ``Tom_Hanks_54745.png``: one face)."""
    import insightface

    return os.path.join(os.path.dirname(insightface.__file__), "data", "images", name)


# The six faces of insightface's t1.jpg (1280x886), placed by eye; sizes differ so "largest" is clear.
T1_FACES: List[TargetFace] = [
    TargetFace(115, 330, 118, angle=-8),   # left, cards in hand
    TargetFace(322, 190, 110, angle=12),   # behind, dark hair
    TargetFace(528, 328, 150, angle=-10),  # centre, the largest
    TargetFace(800, 388, 126, angle=6),    # laughing, red shirt
    TargetFace(972, 130, 140, angle=-4),   # standing, top right
    TargetFace(1182, 332, 100, angle=4),   # right, blonde
]
T1_SIZE = (1280, 886)
# Tom_Hanks_54745.png is already an aligned 112x112 ArcFace crop: the template itself, filling the picture.
TOM_HANKS_FACE = TargetFace(56, 56, 112)
