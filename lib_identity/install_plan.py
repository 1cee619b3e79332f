"""What ``install.py`` installs for face analysis: a pure decision from what is installed.

``plan(installed, cuda)`` takes the installed distributions (name -> version, as
``importlib.metadata`` lists them) and whether torch sees CUDA, and returns the pip argument
lists to run, in order; an empty list when nothing is missing. No network, no side effects.

The rules (issue 8, DESIGN.md "Facts"):

* ``insightface`` 2.1 with ``--no-deps``: its metadata asks for the GUI ``opencv-python``, which
  the WebUI already has in another form, and for the newest ``onnx``.
* The modules its ``app`` / ``model_zoo`` / ``utils.face_align`` chains import, where missing:
  ``onnx`` (with ``--no-deps``: 1.18.0 runs on the WebUI's protobuf 3.20.0 although its metadata
  asks for protobuf >= 4.25.1, which would break the WebUI), ``scikit-image`` (``face_align``),
  ``scipy``, ``opencv``, ``requests``, ``tqdm``, and ``typing_extensions`` (onnx).
* ``onnxruntime-gpu`` where torch sees CUDA, ``onnxruntime`` otherwise; never both, and nothing
  when any onnxruntime build is installed already.
* No upgrade of anything installed: each command that resolves dependencies carries the
  installed versions of the WebUI's pinned packages as exact requirements, so pip picks a
  version of the new package that fits them or fails, rather than moving them.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, List, Mapping, Union

INSIGHTFACE = "insightface==2.1"
ONNX = "onnx==1.18.0"
ONNXRUNTIME_CPU = "onnxruntime"
ONNXRUNTIME_GPU = "onnxruntime-gpu"
# every build that provides the ``onnxruntime`` module: one is enough, two conflict
ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                             "onnxruntime-silicon", "onnxruntime-rocm", "onnxruntime-training")
OPENCV_DISTRIBUTIONS = ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                        "opencv-contrib-python-headless")
# (what insightface imports, the distributions that provide it, what to install when none is there)
INSIGHTFACE_IMPORTS = (
    ("skimage", ("scikit-image",), "scikit-image"),
    ("scipy", ("scipy",), "scipy"),
    ("cv2", OPENCV_DISTRIBUTIONS, "opencv-python-headless"),
    ("requests", ("requests",), "requests"),
    ("tqdm", ("tqdm",), "tqdm"),
    ("typing_extensions", ("typing-extensions",), "typing-extensions"),  # onnx.helper imports it
)
# installed versions of these are held exactly while pip resolves a new package's dependencies
HELD = ("numpy", "protobuf", "torch", "torchvision", "scipy", "scikit-image", "pillow", "packaging", "sympy",
        "requests", "tqdm", "typing-extensions") + OPENCV_DISTRIBUTIONS


def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", str(name)).lower()


def _held(installed: Mapping[str, str], skip: Iterable[str] = ()) -> List[str]:
    skip = {normalize(s) for s in skip}
    return [f"{name}=={installed[name]}" for name in HELD if name in installed and name not in skip]


def plan(installed: Mapping[str, str], cuda: Union[bool, Callable[[], bool]]) -> List[List[str]]:
    """The pip argument lists to run (``["install", ...]``), in order; ``[]`` when nothing is missing.

    ``installed``: distribution name -> version. ``cuda``: whether torch sees a CUDA device, or a
    function answering it (asked only when an onnxruntime has to be chosen).
    """
    have: Dict[str, str] = {normalize(k): str(v) for k, v in installed.items()}
    commands: List[List[str]] = []
    if "onnx" not in have:
        commands.append(["install", "--no-deps", ONNX])
    for _module, providers, requirement in INSIGHTFACE_IMPORTS:
        if not any(p in have for p in providers):
            commands.append(["install", requirement] + _held(have, skip=[requirement]))
    if not any(d in have for d in ONNXRUNTIME_DISTRIBUTIONS):
        use_gpu = cuda() if callable(cuda) else bool(cuda)
        commands.append(["install", ONNXRUNTIME_GPU if use_gpu else ONNXRUNTIME_CPU] + _held(have))
    if "insightface" not in have:  # last, once what it imports is there
        commands.append(["install", "--no-deps", INSIGHTFACE])
    return commands


def installed_distributions() -> Dict[str, str]:
    """The distributions of the running Python: normalised name -> version."""
    from importlib import metadata

    out: Dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name:
            out[normalize(name)] = dist.version
    return out


def torch_sees_cuda() -> bool:
    """Whether the WebUI's torch has a CUDA device (False when torch is missing or broken)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no usable torch: the CPU runtime is the safe choice
        return False
