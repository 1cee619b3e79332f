"""Our InstantID face preprocessors in the ControlNet extension's registry.

sd-webui-controlnet (1.1.440+) has its own ``instant_id_face_embedding`` / ``_keypoints``: they
always take the largest face, analyse a copy shrunk to 512 px and download ``antelopev2`` on
first use. Ours give its units the face a user chose here and our cached analysis:

* ``identity_instant_id_face_embedding``: the chosen face's *raw* ArcFace embedding, a float32
  tensor of shape ``[512]``, which is what the extension's own preprocessor returns and what its
  InstantID IP-Adapter reshapes to ``[1, -1, 512]``. Slider 1 is the face (0 is the largest).
* ``identity_instant_id_face_keypoints``: the chosen face's five keypoints drawn as the official
  ``draw_kps`` draws them. Its canvas is the picture's own size, or, when both are set, the
  "canvas width" (the resolution slider) by the "canvas height" (slider 2), with the keypoints
  moved there as "crop and resize" moves the picture. The bridge sets the canvas to the
  generation's size, so the extension uses the image as it is: the hint the native path draws.

The extension's classes are handed in (``register(external_code)``); nothing here imports it.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import numpy as np

log = logging.getLogger("sd-webui-identity")

EMBEDDING = "identity_instant_id_face_embedding"
KEYPOINTS = "identity_instant_id_face_keypoints"
NAMES = (EMBEDDING, KEYPOINTS)
TAG = "Instant-ID"  # the extension's control-type filter for InstantID
FACE_PACK = "antelopev2"  # InstantID's official insightface pack
MAX_FACE_INDEX = 31
MAX_CANVAS = 8192
_OURS = "_identity_preprocessor"  # marks our instances, so a reloaded script replaces them


def _face_pack() -> str:
    from . import lookup

    return lookup.find_encoder_for_run(f"insightface:{FACE_PACK}")


def chosen_face(image, face_index, *, pack_dir: Optional[str] = None):
    """``(rgb picture, face)``: the face at ``face_index`` (0 is the largest) of ``image``, from the
    shared, cached analysis. Errors say which preprocessor and how many faces there are."""
    from ..encoders import faces as face_analysis
    from ..encoders.preprocess import to_rgb

    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]  # the extension adds its mask as alpha (zeros): not transparency
    rgb = to_rgb(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image)
    found = face_analysis.analyse_faces(rgb, pack_dir or _face_pack())
    index = 0 if face_index is None or float(face_index) < 0 else int(round(float(face_index)))
    face = face_analysis.pick_face(found, index, image_label="the ControlNet unit's picture")
    return rgb, face


def canvas_of(source_size: Tuple[int, int], width, height) -> Tuple[int, int]:
    """The keypoint canvas: ``(width, height)`` when both are positive, else the picture's own size."""
    w = int(round(float(width))) if width is not None else 0
    h = int(round(float(height))) if height is not None else 0
    return (w, h) if w > 0 and h > 0 else (int(source_size[0]), int(source_size[1]))


def keypoint_image(keypoints, source_size: Tuple[int, int], canvas: Tuple[int, int]) -> np.ndarray:
    """H x W x 3 uint8 RGB: the keypoints of a ``source_size`` picture drawn on ``canvas`` (w, h)."""
    from ..encoders.faces.keypoints import draw_keypoints, keypoints_in_frame

    kps = np.asarray(keypoints, dtype=np.float32).reshape(5, 2)
    kps = keypoints_in_frame(kps, tuple(source_size), tuple(canvas))  # as the native path moves them
    return draw_keypoints(kps, int(canvas[0]), int(canvas[1]))


def face_embedding(image, face_index=0, *, pack_dir: Optional[str] = None):
    """``(embedding, display)``: the chosen face's raw embedding (torch float32 ``[512]``) and the
    picture with that face boxed (what the extension shows as the preprocessor's result)."""
    import torch

    from ..encoders import faces as face_analysis

    rgb, face = chosen_face(image, face_index, pack_dir=pack_dir)
    embedding = torch.from_numpy(np.array(face.embedding, dtype=np.float32).reshape(-1))
    return embedding, np.asarray(face_analysis.draw_faces(rgb, [face]))


def face_keypoints(image, face_index=0, canvas_width=0, canvas_height=0, *, pack_dir: Optional[str] = None):
    """The keypoint image of the chosen face (see the module docstring for the canvas)."""
    rgb, face = chosen_face(image, face_index, pack_dir=pack_dir)
    source = (rgb.width, rgb.height)
    return keypoint_image(face.keypoints, source, canvas_of(source, canvas_width, canvas_height))


def _classes(Preprocessor, Parameter):
    """Our two preprocessor classes, made from the extension's ``Preprocessor`` (a dataclass)."""

    face_slider = dict(label="Face (0 is the largest)", minimum=0, maximum=MAX_FACE_INDEX, value=0, step=1,
                       visible=True)

    class FaceEmbedding(Preprocessor):
        def __init__(self):
            super().__init__(name=EMBEDDING)
            self.tags = [TAG]
            self.returns_image = False
            self.slider_resolution = Parameter(visible=False)
            self.slider_1 = Parameter(**face_slider)
            self.sorting_priority = 0
            setattr(self, _OURS, True)

        def __call__(self, input_image, resolution=None, slider_1=None, slider_2=None, slider_3=None,
                     input_mask=None, **kwargs):
            embedding, shown = face_embedding(input_image, slider_1)
            return Preprocessor.Result(value=embedding, display_images=[shown])

    class FaceKeypoints(Preprocessor):
        def __init__(self):
            super().__init__(name=KEYPOINTS)
            self.tags = [TAG]
            self.returns_image = True
            self.slider_resolution = Parameter(label="Keypoint canvas width (0: the picture's)", minimum=0,
                                               maximum=MAX_CANVAS, value=0, step=8, visible=True)
            self.slider_1 = Parameter(**face_slider)
            self.slider_2 = Parameter(label="Keypoint canvas height (0: the picture's)", minimum=0,
                                      maximum=MAX_CANVAS, value=0, step=8, visible=True)
            self.sorting_priority = 0
            setattr(self, _OURS, True)

        def __call__(self, input_image, resolution=None, slider_1=None, slider_2=None, slider_3=None,
                     input_mask=None, **kwargs):
            return face_keypoints(input_image, slider_1, resolution, slider_2)

    return FaceEmbedding, FaceKeypoints


def register(external_code) -> bool:
    """Add (or, after a script reload, replace) our two preprocessors in the extension's registry.

    Returns False, and changes nothing, when the registry is missing (an extension older than
    1.1.440) or a preprocessor of someone else already has one of our names.
    """
    Preprocessor = getattr(external_code, "Preprocessor", None)
    Parameter = getattr(external_code, "PreprocessorParameter", None)
    if Preprocessor is None or Parameter is None or not hasattr(Preprocessor, "add_supported_preprocessor"):
        return False
    for name in NAMES:
        existing = Preprocessor.get_preprocessor(name)
        if existing is not None and not getattr(existing, _OURS, False):
            log.warning("identity: the ControlNet extension already has a preprocessor named %s; ours is not added", name)
            return False
    for cls in _classes(Preprocessor, Parameter):
        instance = cls()
        if Preprocessor.get_preprocessor(instance.name) is not None:  # ours, from before a script reload
            _forget(Preprocessor, instance.name)
        Preprocessor.add_supported_preprocessor(instance)
    return True


def _forget(Preprocessor, name: str) -> None:
    """Take our earlier instance out of the registry (its add asserts names are new)."""
    for table in ("all_processors", "all_processors_by_name"):
        entries = getattr(Preprocessor, table, {})
        for key in [k for k, v in entries.items() if getattr(v, "name", None) == name]:
            del entries[key]
