"""Image encoders for the adapters: CLIP vision (transformers) and face analysis (insightface), with caches.

Public API:

* ``Preparation``, ``prepare_pixels(images, prep, size)`` - fitting pictures to the encoder.
* ``find_encoder(encoder_id, folders)``, ``load_encoder(path, encoder_id=None)`` - files.
* ``encode_images(encoder, images, output, prep, device, dtype, uncond)`` - cached encodings
  (``encode_uncond``: the uncond side alone, for encodings a profile holds).
* ``set_offload_policy(policy)``, ``release_encoders()`` - what the WebUI settings drive.
* ``analyse_faces``, ``pick_face``, ``aligned_face``, ``draw_faces``, ``find_pack`` - faces (``encoders.faces``).

transformers is imported only when an encoder is built or run; insightface only when faces are analysed.
"""

from .cache import (
    OFFLOAD_POLICIES,
    EncoderRegistry,
    EncodingCache,
    default_cache,
    default_registry,
    release_encoders,
    set_offload_policy,
)
from .clip_vision import (
    ENCODER_IDS,
    OUTPUTS,
    EncoderInfo,
    build_encoder,
    encoder_info,
    find_encoder,
    load_encoder,
    make_config,
    run_encoder,
    shipped_config,
)
from .encode import UNCOND_KINDS, encode_images, encode_uncond
from .faces import (
    Face,
    FacePack,
    FacePackNotFound,
    aligned_face,
    analyse_faces,
    default_face_cache,
    draw_faces,
    find_pack,
    pick_face,
)
from .preprocess import (
    CROP_POSITIONS,
    DEFAULT_PREPARATION,
    MODES,
    Preparation,
    cropped_fraction,
    fit,
    image_digest,
    prepare_pixels,
    to_rgb,
)

__all__ = [
    "CROP_POSITIONS",
    "DEFAULT_PREPARATION",
    "ENCODER_IDS",
    "MODES",
    "OFFLOAD_POLICIES",
    "OUTPUTS",
    "UNCOND_KINDS",
    "EncoderInfo",
    "EncoderRegistry",
    "EncodingCache",
    "Face",
    "FacePack",
    "FacePackNotFound",
    "Preparation",
    "aligned_face",
    "analyse_faces",
    "build_encoder",
    "cropped_fraction",
    "default_cache",
    "default_face_cache",
    "draw_faces",
    "default_registry",
    "encode_images",
    "encode_uncond",
    "encoder_info",
    "find_encoder",
    "find_pack",
    "fit",
    "image_digest",
    "load_encoder",
    "make_config",
    "pick_face",
    "prepare_pixels",
    "release_encoders",
    "run_encoder",
    "set_offload_policy",
    "shipped_config",
    "to_rgb",
]
