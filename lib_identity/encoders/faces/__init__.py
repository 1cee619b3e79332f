"""Face analysis through insightface, shared by FaceID, InstantID and PhotoMaker V2.

* ``search_folders(...)``, ``find_pack(name, folders)``, ``open_pack(...)`` - where packs are.
* ``analyse_faces(image, pack_dir, det_size=640)`` - every ``Face`` (box, score, keypoints,
  raw and normed embedding), largest first, cached by picture content.
* ``pick_face(faces, choice, unit_number=, image_label=)`` - ``largest``, an index or a box.
* ``aligned_face(image, face, size)`` - insightface's ``norm_crop`` (112 ArcFace, 224 FaceID-Plus).
* ``draw_faces(image, faces)`` - numbered boxes for the face picker, the API and the CLI.
* ``draw_keypoints(kps, width, height)`` - InstantID's keypoint image (official draw_kps), and
  ``keypoints_in_frame(kps, source_size, target_size)`` - keypoints moved into a generation's frame.

insightface, onnx and onnxruntime are imported only when faces are analysed or cropped.
"""

from .analysis import (
    DEFAULT_DET_SIZE,
    FALLBACK_DET_SIZES,
    Face,
    FaceCache,
    PackModels,
    analyse_faces,
    analysis_count,
    choose_providers,
    default_face_cache,
    pack_models,
    release_faces,
)
from .keypoints import draw_keypoints, keypoints_in_frame
from .packs import DEFAULT_PACK, KNOWN_PACK_FILES, FacePack, FacePackNotFound, find_pack, open_pack, search_folders
from .picking import FACE_CHOICES_HELP, OFFICIAL_FACEID_PLUS_CHANNELS, aligned_face, draw_faces, pick_face

__all__ = [
    "DEFAULT_DET_SIZE",
    "DEFAULT_PACK",
    "FACE_CHOICES_HELP",
    "FALLBACK_DET_SIZES",
    "KNOWN_PACK_FILES",
    "OFFICIAL_FACEID_PLUS_CHANNELS",
    "Face",
    "FaceCache",
    "FacePack",
    "FacePackNotFound",
    "PackModels",
    "aligned_face",
    "analyse_faces",
    "analysis_count",
    "choose_providers",
    "default_face_cache",
    "draw_faces",
    "draw_keypoints",
    "find_pack",
    "keypoints_in_frame",
    "open_pack",
    "pack_models",
    "pick_face",
    "release_faces",
    "search_folders",
]
