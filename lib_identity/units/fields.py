"""The field table: every field of a unit, once.

Each ``FieldSpec`` says what a field is for every entry point: its default, its parser (which
also says in words what it accepts), the accordion's label, widget and place, a line of help,
its key in infotext and when it is written there, whether the X/Y/Z plot offers it as an axis,
and which methods use it. The ``Unit`` type, the API's named fields, the accordion's components
and their order, infotext and the X/Y/Z axes are all derived from ``FIELDS``; a field added for a
new method is one entry here (appended, so positional callers keep working).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..formats import CROSS_ATTENTION_LAYERS
from ..unet.layer_weights import PRESETS
from ..unet.references import COMBINE_MODES as REFERENCE_COMBINE_MODES
from .parsers import (MAX_IMAGES, Bool, Choice, FaceChoice, Images, ModelName, Number, Numbers, OneImage, PoseFace,
                      ProfileName, Word)

# The layer-weight presets and combine modes are named where they are implemented, so the UI,
# the API, infotext and X/Y/Z offer exactly what the UNet code does.
LAYER_PRESETS = PRESETS  # defined with their block choices in lib_identity.unet.layer_weights
CUSTOM_LAYERS = "custom"  # the preset name that means "use layer_weights"
LAYER_PRESET_CHOICES = LAYER_PRESETS + (CUSTOM_LAYERS,)
COMBINE_MODES = REFERENCE_COMBINE_MODES  # lib_identity.unet.references
WEIGHTED = "weighted average"
PREPARATIONS = ("crop", "pad", "squash")
CROP_POSITIONS = ("center", "top", "bottom", "left", "right")
UNCOND_MODES = ("zero", "noise", "image")

WEIGHT_RANGE = (-1.0, 3.0)
LAYER_WEIGHT_RANGE = (-1.0, 3.0)
IMAGE_WEIGHT_RANGE = (0.0, 10.0)
MAX_LAYER_WEIGHTS = max(CROSS_ATTENTION_LAYERS.values())

# The methods a field can serve (``FieldSpec.methods``), by the model families that run them.
METHODS = ("ip-adapter", "faceid", "instantid", "photomaker")
METHOD_OF_FAMILY = {
    "ip-adapter": "ip-adapter",
    "ip-adapter-faceid": "faceid",
    "instantid-adapter": "instantid",
    "photomaker": "photomaker",
}
ATTENTION_METHODS = ("ip-adapter", "faceid", "instantid")  # the ones that add image tokens to cross-attention
CLIP_METHODS = ("ip-adapter", "photomaker")  # the ones that fit whole pictures to a CLIP encoder
FACE_METHODS = ("faceid", "instantid", "photomaker")  # the ones that start from insightface's faces
LORA_METHODS = ("faceid", "photomaker")  # the ones whose files carry a LoRA for the UNet
PHOTOMAKER_START = 0.2  # the official start_merge_step: 10 of 50 steps
# weight and combine: InstantID has ip_weight and averages its faces; PhotoMaker's identity is in the prompt
IMAGE_PROMPT_METHODS = ("ip-adapter", "faceid")
S_SCALE_RANGE = (0.0, 3.0)
LORA_WEIGHT_RANGE = (0.0, 2.0)

# Where a field's component goes in a unit's tab.
WIDGETS = ("checkbox", "model", "files", "slider", "radio", "dropdown", "textbox", "image", "mask", "face", "profile")


@dataclass(frozen=True)
class FieldSpec:
    """One field of a unit, for every entry point (see the module docstring)."""

    name: str
    default: Any
    parse: Callable  # a parser of ``units.parsers``: ``parse(value, context) -> value``; ``.expected`` in words
    help: str
    label: str  # the accordion's label; "{number}" is the unit's number
    widget: str  # one of WIDGETS
    row: str  # fields with the same row share one row of the tab, in table order
    section: Optional[str] = None  # a collapsed accordion of the tab that holds the row
    visible_if: Optional[Tuple[str, Any]] = None  # (field, value): shown only while that field has that value
    step: Optional[float] = None  # sliders
    infotext: Optional[str] = None  # the key inside the unit's "Identity N" entry; None: not recorded
    record: Optional[Callable[[Any], bool]] = None  # unit -> whether to write the key (None: always)
    picture: bool = False  # recorded as content hashes, never restored from infotext
    axis: bool = False  # offered as an X/Y/Z axis
    overridable: bool = True  # settable per X/Y/Z cell (pictures are not)
    methods: Tuple[str, ...] = METHODS
    method_defaults: Tuple[Tuple[str, Any], ...] = ()  # (method, default) where a method's default differs
    recorded_for: Tuple[str, ...] = ()  # methods whose units always record the key (whatever ``record`` says)

    def default_for(self, method: Optional[str]) -> Any:
        """The default for a unit of ``method`` (``default`` unless ``method_defaults`` names it)."""
        return dict(self.method_defaults).get(method, self.default)

    @property
    def expected(self) -> str:
        return self.parse.expected

    @property
    def restored(self) -> bool:
        """Whether pasted infotext sets this field's component."""
        return self.name == "enabled" or (self.infotext is not None and not self.picture)


def _unless_default(name: str, default) -> Callable[[Any], bool]:
    return lambda unit: getattr(unit, name) != default


FIELDS: Tuple[FieldSpec, ...] = (
    FieldSpec("enabled", False, Bool(), "use this unit (a unit sent through the API is on unless it says false)", "Enable unit {number}", "checkbox", "model", axis=True),
    FieldSpec("model", "", ModelName(), "the model, by the name GET /identity/v1/models lists (name or 'name [hash]')",
              "Model", "model", "model", infotext="model", axis=True),
    FieldSpec("images", (), Images(), "the reference pictures", "Reference images", "files", "images",
              infotext="images", record=lambda u: bool(u.images), picture=True, overridable=False),
    FieldSpec("image_weights", (), Numbers(*IMAGE_WEIGHT_RANGE, most=MAX_IMAGES, empty=(), each="reference image"),
              "how much each reference image counts when combine is 'weighted average' (default 1 each)",
              "Image weights (one per image)", "textbox", "combine", visible_if=("combine", WEIGHTED),
              infotext="image weights", record=lambda u: u.combine == WEIGHTED, methods=IMAGE_PROMPT_METHODS),
    FieldSpec("weight", 1.0, Number(*WEIGHT_RANGE), "strength of the unit; negative pushes away from the reference",
              "Weight", "slider", "strength", step=0.05, infotext="weight", axis=True, methods=IMAGE_PROMPT_METHODS),
    FieldSpec("start", 0.0, Number(0.0, 1.0), "fraction of the sampling steps where the unit starts acting "
              "(PhotoMaker: before it the prompt without the trigger word is used; its default is 0.2, the official 10 of 50 steps)",
              "Start (fraction of steps)", "slider", "strength", step=0.01, infotext="start", axis=True,
              method_defaults=(("photomaker", PHOTOMAKER_START),)),
    FieldSpec("end", 1.0, Number(0.0, 1.0), "fraction of the sampling steps where it stops (after start)",
              "End (fraction of steps)", "slider", "strength", step=0.01, infotext="end", axis=True, methods=ATTENTION_METHODS),
    FieldSpec("combine", "average", Choice(COMBINE_MODES), "how several reference images are combined",
              "Several images", "radio", "combine", infotext="combine", axis=True, methods=IMAGE_PROMPT_METHODS),
    FieldSpec("preparation", "crop", Choice(PREPARATIONS), "how a reference image is fitted to the encoder's square input",
              "Fit to the encoder's square", "radio", "fit", infotext="preparation", methods=CLIP_METHODS),
    FieldSpec("crop_position", "center", Choice(CROP_POSITIONS), "which part a 'crop' preparation keeps",
              "Keep", "dropdown", "fit", visible_if=("preparation", "crop"), infotext="crop position",
              record=lambda u: u.preparation == "crop" and u.crop_position != "center", methods=CLIP_METHODS),
    FieldSpec("layer_preset", "standard", Choice(LAYER_PRESET_CHOICES),
              "which UNet layers get the identity ('custom': layer_weights)", "Layers", "dropdown", "layers",
              infotext="layers", axis=True, methods=ATTENTION_METHODS),
    FieldSpec("layer_weights", None, Numbers(*LAYER_WEIGHT_RANGE, most=MAX_LAYER_WEIGHTS, empty=None, each="cross-attention layer"),
              "custom weight per cross-attention layer in UNet order (16 for SD1.5, 70 for SDXL); implies layer_preset 'custom'",
              "Weight per cross-attention layer (16 SD1.5 / 70 SDXL)", "textbox", "layers",
              visible_if=("layer_preset", CUSTOM_LAYERS), infotext="layers", record=lambda u: False,
              methods=ATTENTION_METHODS),
    FieldSpec("mask", None, OneImage(mask=True), "region where the unit acts (white), the rest is left alone",
              "Region mask (white = where the unit acts)", "mask", "region", section="Region and negative",
              infotext="mask", record=lambda u: u.mask is not None, picture=True, overridable=False,
              methods=ATTENTION_METHODS),
    FieldSpec("uncond", "zero", Choice(UNCOND_MODES), "what the negative (uncond) side sees: zeros, noise, or negative_image",
              "Negative side", "radio", "region", section="Region and negative", infotext="uncond",
              record=_unless_default("uncond", "zero"), methods=("ip-adapter",)),
    FieldSpec("negative_image", None, OneImage(mask=False), "the picture to steer away from (uncond 'image')",
              "Negative image", "image", "region", section="Region and negative", visible_if=("uncond", "image"),
              infotext="negative image", record=lambda u: u.negative_image is not None, picture=True,
              overridable=False, methods=("ip-adapter",)),
    FieldSpec("face", "largest", FaceChoice(), "which face of each reference picture the unit uses; the face picker "
              "numbers them, largest first", "Face", "face", "face", infotext="face",
              record=_unless_default("face", "largest"), axis=True, methods=FACE_METHODS),
    FieldSpec("s_scale", 1.0, Number(*S_SCALE_RANGE), "FaceID-Plus v2: how much the CLIP features of the face crop "
              "add to the face tokens (the official s_scale)", "Face structure (s_scale, FaceID-Plus v2)", "slider",
              "faceid", step=0.05, infotext="s scale", record=_unless_default("s_scale", 1.0), axis=True,
              methods=("faceid",)),
    FieldSpec("lora_weight", 1.0, Number(*LORA_WEIGHT_RANGE), "FaceID and PhotoMaker: strength of the LoRA inside the "
              "model file (0 turns it off; files without one ignore it)", "LoRA weight (the model file's own)", "slider",
              "faceid", step=0.05, infotext="lora weight", record=_unless_default("lora_weight", 1.0), axis=True,
              methods=LORA_METHODS, recorded_for=("photomaker",)),
    # InstantID (appended: positional callers keep working)
    FieldSpec("ip_weight", 0.8, Number(*WEIGHT_RANGE), "InstantID: strength of the face tokens in cross-attention "
              "(the Image Adapter); it acts between start and end", "Image Adapter weight", "slider", "instantid",
              step=0.05, infotext="ip weight", record=_unless_default("ip_weight", 0.8), axis=True, methods=("instantid",)),
    FieldSpec("identitynet_weight", 0.8, Number(0.0, 2.0), "InstantID: strength of IdentityNet, the ControlNet that "
              "holds the face's keypoints and identity (0 turns it off)", "IdentityNet weight", "slider", "instantid",
              step=0.05, infotext="identitynet weight", record=_unless_default("identitynet_weight", 0.8), axis=True,
              methods=("instantid",)),
    FieldSpec("identitynet_start", 0.0, Number(0.0, 1.0), "InstantID: fraction of the steps where IdentityNet starts "
              "(the official control_guidance_start)", "IdentityNet start", "slider", "instantid window", step=0.01,
              infotext="identitynet start", record=_unless_default("identitynet_start", 0.0), methods=("instantid",)),
    FieldSpec("identitynet_end", 1.0, Number(0.0, 1.0), "InstantID: fraction of the steps where IdentityNet stops "
              "(the official control_guidance_end)", "IdentityNet end", "slider", "instantid window", step=0.01,
              infotext="identitynet end", record=_unless_default("identitynet_end", 1.0), methods=("instantid",)),
    FieldSpec("pose_image", None, OneImage(mask=False), "InstantID: a picture whose face sets the pose (its keypoints, "
              "moved into the frame); without it the first reference picture's face does", "Pose picture (optional)",
              "image", "instantid pose", infotext="pose image", record=lambda u: u.pose_image is not None, picture=True,
              overridable=False, methods=("instantid",)),
    FieldSpec("uncond_noise", 0.0, Number(0.0, 1.0), "InstantID: noise in the negative side's face embedding "
              "(0: the official zero embedding; ComfyUI_InstantID suggests 0.35)", "Negative noise", "slider",
              "instantid pose", step=0.05, infotext="uncond noise", record=_unless_default("uncond_noise", 0.0),
              methods=("instantid",)),
    FieldSpec("via_controlnet", False, Bool(), "InstantID: run IdentityNet and the Image Adapter as units of the "
              "ControlNet extension (sd-webui-controlnet 1.1.440+) instead of natively", "Through the ControlNet extension",
              "checkbox", "instantid pose", infotext="via controlnet", record=lambda u: bool(u.via_controlnet),
              methods=("instantid",)),
    # PhotoMaker (appended after InstantID's, same reason)
    FieldSpec("trigger", "img", Word(), "PhotoMaker: the trigger word of the prompt; the word just before it is the class "
              "word that takes the identity ('a photo of a man img'); it is removed from the text",
              "Trigger word (after the class word: 'a man img')", "textbox", "photomaker", infotext="trigger",
              record=_unless_default("trigger", "img"), recorded_for=("photomaker",), methods=("photomaker",)),
    # Several people in one image (issue 11, part 3; appended, same reason)
    FieldSpec("pose_face", "auto", PoseFace(), "InstantID: which face of the pose picture sets the unit's keypoints. "
              "With several faces there and no mask, that face's box, grown by a quarter of its size on each side, is the "
              "unit's region", "Face of the pose picture (from the left)", "dropdown", "instantid pose face",
              infotext="pose face", record=_unless_default("pose_face", "auto"), axis=True, methods=("instantid",)),
    # Identity profiles (issue 11, part 2; appended, same reason)
    FieldSpec("profile", "", ProfileName(), "a saved identity profile to use instead of images (GET "
              "/identity/v1/profiles lists them); its faces and encodings were computed when it was built",
              "Profile (instead of reference images)", "profile", "images profile", infotext="profile",
              record=lambda u: bool(u.profile), axis=True),
)

SPECS: Dict[str, FieldSpec] = {f.name: f for f in FIELDS}
DEFAULTS: Dict[str, Any] = {f.name: f.default for f in FIELDS}

# The named fields of an API unit object.
API_FIELDS: Tuple[str, ...] = tuple(SPECS)
# The order of one unit's values in the script's args (the accordion lays out its components in
# this order). A new field is appended, so older positional callers keep working. No default
# value of these components may be a dict: a dict in the args means an API unit object.
UI_FIELDS: Tuple[str, ...] = tuple(SPECS)
# Fields an X/Y/Z cell may override, and the ones offered as axes.
OVERRIDABLE_FIELDS: Tuple[str, ...] = tuple(f.name for f in FIELDS if f.overridable)
AXIS_FIELDS: Tuple[str, ...] = tuple(f.name for f in FIELDS if f.axis)
# What pasted infotext restores into the accordion (pictures are named in a "needs" line instead).
RESTORED_FIELDS: Tuple[str, ...] = tuple(f.name for f in FIELDS if f.restored)
API_DEFAULTS: Dict[str, Any] = dict(DEFAULTS, enabled=True)


def field_docs() -> List[dict]:
    """Every field with its API default, what it accepts, what it does and which methods use it (for the README)."""
    rows = []
    for spec in FIELDS:
        default = API_DEFAULTS[spec.name]
        rows.append({"name": spec.name, "default": list(default) if isinstance(default, tuple) else default,
                     "method_defaults": dict(spec.method_defaults),
                     "accepts": spec.expected, "help": spec.help, "methods": list(spec.methods),
                     "infotext": spec.infotext, "axis": spec.axis})
    return rows


def _default_text(spec: FieldSpec, default) -> str:
    import json

    def code(value):
        return f"`{json.dumps(list(value) if isinstance(value, tuple) else value)}`"

    if spec.name == "image_weights":
        return "1 per image"
    if default in ("", ()):
        return "—"
    text = code(default)
    for method, value in spec.method_defaults:
        text += f" ({method}: {code(value)})"
    return text


def field_table_markdown() -> str:
    """The README's table of API fields, made from the field table (a test keeps the README equal to it)."""
    lines = ["| field | default | accepts | meaning | used by |", "|---|---|---|---|---|"]
    for spec in FIELDS:
        used = "all methods" if spec.methods == METHODS else ", ".join(spec.methods)
        cells = [f"`{spec.name}`", _default_text(spec, API_DEFAULTS[spec.name]), spec.expected, spec.help, used]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
