"""Every face of a picture through insightface (detection, five keypoints, ArcFace embedding), cached.

* ``analyse_faces(image, pack, det_size=640)``: the faces, largest first. A picture is analysed
  once per (content digest, pack folder, detection size); the result is kept in a bounded LRU
  (``default_face_cache()``, sized by the same cache-size setting as the encodings).
* Each pack's detection and recognition models are opened once through insightface's own
  ``model_zoo.get_model`` on the ``.onnx`` *files* (never a pack name: insightface 2.x downloads a
  named pack it cannot find) and kept. The other models of a pack (landmarks, gender/age) are not
  opened: the files are told apart by their inputs and outputs, as insightface's router does.
* Detection runs at ``det_size`` (640) and, when nothing is found, again at 320 and 160, where a
  face that fills the picture fits the detector.
* ``analysis_count()`` counts analyses that ran ONNX sessions, so a test can prove a cache hit.

insightface, onnx and onnxruntime are imported only when a pack is opened.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ...errors import EncoderError
from ..preprocess import image_digest, to_rgb
from .packs import FacePack, FacePackNotFound, open_pack

DEFAULT_DET_SIZE = 640
FALLBACK_DET_SIZES = (320, 160)
DETECTION_THRESHOLD = 0.5  # insightface's default, as the official FaceID / InstantID code runs it


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face, in picture pixels.

    ``embedding`` is the raw ArcFace output (insightface's ``face.embedding``: InstantID and
    PhotoMaker V2 use it); ``normed_embedding`` is it divided by its L2 norm (FaceID uses it).
    """

    box: Tuple[float, float, float, float]
    score: float
    keypoints: np.ndarray  # (5, 2) float32: eyes, nose, mouth corners
    embedding: np.ndarray  # (512,) float32

    @property
    def normed_embedding(self) -> np.ndarray:
        return self.embedding / np.linalg.norm(self.embedding)

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)

    def to_json(self) -> dict:
        """Box, score and keypoints (what the API and the CLI show; the embedding is left out)."""
        return {
            "box": [round(float(v), 2) for v in self.box],
            "score": round(float(self.score), 4),
            "keypoints": [[round(float(x), 2), round(float(y), 2)] for x, y in self.keypoints],
        }


class FaceCache:
    """Least-recently-used analyses (tuples of ``Face``), bounded by entry count; 0 keeps nothing."""

    def __init__(self, max_entries: int = 64):
        if max_entries < 0:
            raise ValueError("the face cache size must be 0 or more")
        self.max_entries = int(max_entries)
        self._items: "OrderedDict[Hashable, Tuple[Face, ...]]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, faces: Sequence[Face]) -> None:
        with self._lock:
            self._items.pop(key, None)
            if self.max_entries == 0:
                return
            self._items[key] = tuple(faces)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def resize(self, max_entries: int) -> None:
        """A new bound (the WebUI's cache-size setting); the oldest entries go first."""
        if max_entries < 0:
            raise ValueError("the face cache size must be 0 or more")
        with self._lock:
            self.max_entries = int(max_entries)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


_cache = FaceCache()
_packs: Dict[Tuple[str, Tuple[str, ...]], "PackModels"] = {}
_packs_lock = threading.Lock()
_runs = 0
_provider_said = False


def default_face_cache() -> FaceCache:
    return _cache


def analysis_count() -> int:
    """How many analyses have run ONNX sessions in this process (cache hits do not count)."""
    return _runs


def release_faces() -> None:
    """Forget every opened pack (its ONNX sessions) and every cached analysis."""
    with _packs_lock:
        _packs.clear()
    _cache.clear()


def choose_providers() -> List[str]:
    """CUDA when onnxruntime-gpu offers it and torch sees a CUDA device, else the CPU."""
    import onnxruntime

    use_cuda = False
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        try:
            import torch

            use_cuda = bool(torch.cuda.is_available())
        except Exception:  # noqa: BLE001 - no usable torch: stay on the CPU
            use_cuda = False
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]


def _say_providers(asked: Sequence[str], active: Sequence[str]) -> None:
    """Once per process, the console line saying where face analysis runs (what onnxruntime really made)."""
    global _provider_said
    if _provider_said:
        return
    _provider_said = True
    version = _insightface_version()
    if "CUDAExecutionProvider" in active:
        print(f"[identity] face analysis (insightface {version}) runs on CUDA (onnxruntime-gpu)")
    elif "CUDAExecutionProvider" in asked:
        print(f"[identity] face analysis (insightface {version}) runs on the CPU: onnxruntime-gpu could not start "
              "CUDA (its CUDA/cuDNN versions must match the ones torch brings)")
    else:
        print(f"[identity] face analysis (insightface {version}) runs on the CPU (onnxruntime)")


def _insightface_version() -> str:
    try:
        import insightface

        return str(getattr(insightface, "__version__", "?"))
    except Exception:  # noqa: BLE001
        return "?"


def _task_of(path: str) -> Optional[str]:
    """'detection', 'recognition' or None for an .onnx file, read from its graph's inputs and
    outputs without making a session (the rule of insightface's model router)."""
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except TypeError:  # older onnx without the keyword
        model = onnx.load(path)
    graph = model.graph
    if len(graph.output) >= 5:
        return "detection"
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] if graph.input else []
    if len(dims) == 4 and len(graph.input) == 1 and dims[2] == dims[3] and dims[2] >= 112 and dims[2] % 16 == 0 \
            and dims[2] not in (192, 128, 96):
        return "recognition"
    return None


class PackModels:
    """A pack's detection and recognition models, opened once on the chosen providers."""

    def __init__(self, pack: FacePack, providers: Sequence[str]):
        from insightface import model_zoo

        self.pack = pack
        self.providers = list(providers)
        chosen: Dict[str, str] = {}
        for path in pack.files:
            task = _task_of(path)
            if task and task not in chosen:  # the first file per task in name order, as FaceAnalysis keeps
                chosen[task] = path
        missing = [t for t in ("detection", "recognition") if t not in chosen]
        if missing:
            listed = ", ".join(os.path.basename(f) for f in pack.files) or "none"
            raise FacePackNotFound(pack.name, [pack.folder],
                                   f"{pack.folder} has no {' and no '.join(missing)} model (its .onnx files: {listed})")
        ctx_id = 0 if "CUDAExecutionProvider" in self.providers else -1
        self.detector = model_zoo.get_model(chosen["detection"], providers=self.providers)
        self.recognizer = model_zoo.get_model(chosen["recognition"], providers=self.providers)
        self.detector.prepare(ctx_id, det_thresh=DETECTION_THRESHOLD, input_size=(DEFAULT_DET_SIZE, DEFAULT_DET_SIZE))
        self.recognizer.prepare(ctx_id)
        session = getattr(self.recognizer, "session", None)
        self.active_providers = list(session.get_providers()) if session is not None else list(self.providers)
        _say_providers(self.providers, self.active_providers)
        self.files = (chosen["detection"], chosen["recognition"])
        self.lock = threading.Lock()

    def analyse(self, bgr: np.ndarray, det_size: int) -> List[Face]:
        """Detect at ``det_size``, then at the smaller fallback sizes until a face is found; embed each face."""
        from insightface.app.common import Face as InsightFace

        sizes = [int(det_size)] + [s for s in FALLBACK_DET_SIZES if s < int(det_size)]
        with self.lock:
            boxes = kpss = None
            for size in sizes:
                boxes, kpss = self.detector.detect(bgr, input_size=(size, size), max_num=0)
                if boxes is not None and len(boxes):
                    break
            faces: List[Face] = []
            if boxes is None or not len(boxes) or kpss is None:
                return faces
            for i in range(len(boxes)):
                found = InsightFace(bbox=boxes[i, :4], kps=kpss[i], det_score=boxes[i, 4])
                self.recognizer.get(bgr, found)  # insightface aligns (norm_crop at 112) and embeds
                faces.append(_frozen_face(found))
        # largest first; equal areas keep the detector's order (highest score first)
        return sorted(faces, key=lambda f: -f.area)


def _frozen_face(found) -> Face:
    kps = np.array(found.kps, dtype=np.float32).reshape(5, 2)
    emb = np.array(found.embedding, dtype=np.float32).reshape(-1)
    for a in (kps, emb):
        a.setflags(write=False)  # shared through the cache: nobody may change them
    return Face(box=tuple(float(v) for v in found.bbox[:4]), score=float(found.det_score), keypoints=kps, embedding=emb)


def pack_models(pack: Union[str, FacePack], providers: Optional[Sequence[str]] = None) -> PackModels:
    """The opened models of a pack (a ``FacePack`` or a pack folder), made on first use and kept."""
    if not isinstance(pack, FacePack):
        pack = open_pack(os.fspath(pack))
    providers = tuple(providers) if providers is not None else tuple(choose_providers())
    key = (os.path.abspath(pack.folder), providers)
    with _packs_lock:
        models = _packs.get(key)
        if models is None:
            models = PackModels(pack, providers)
            _packs[key] = models
        return models


def analyse_faces(image, pack_dir: Union[str, FacePack], *, det_size: int = DEFAULT_DET_SIZE,
                  cache: Optional[FaceCache] = None, providers: Optional[Sequence[str]] = None) -> List[Face]:
    """Every face in ``image`` (PIL image or HxWx3 RGB uint8 array), largest first.

    ``pack_dir``: the pack's folder (``find_pack``) or a ``FacePack``. Results are cached per
    (picture content, pack folder, detection size); the second call with the same picture runs no
    ONNX session. A picture without a face gives an empty list (``pick_face`` turns it into the
    error the user sees).
    """
    global _runs
    det_size = int(det_size)
    if det_size < 32 or det_size > 2048 or det_size % 32:
        raise EncoderError(f"the face detection size must be a multiple of 32 (like 640), got {det_size}")
    cache = _cache if cache is None else cache
    folder = os.path.abspath(pack_dir.folder if isinstance(pack_dir, FacePack) else os.fspath(pack_dir))
    rgb = to_rgb(image)
    key = ("faces", image_digest(rgb), folder, det_size)
    hit = cache.get(key)
    if hit is not None:
        return list(hit)
    models = pack_models(pack_dir, providers)
    bgr = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])  # insightface works on cv2's BGR order
    faces = models.analyse(bgr, det_size)
    _runs += 1
    cache.put(key, faces)
    return faces
