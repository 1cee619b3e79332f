"""Units: one model, its reference pictures and its knobs, from every entry point.

* ``fields``: the field table, every field once (default, parser, label, widget, help, infotext
  key, X/Y/Z axis, methods). Everything below is derived from it.
* ``parsers``: one parser per kind of value, shared by every entry point.
* ``unit``: the ``Unit`` type, ``from_api`` / ``from_ui`` and the cross-field rules.
* ``script_args``: the WebUI script's args (accordion values or API unit objects) -> Units.
* ``infotext``: ``Identity N`` entries written and read back.
* ``overrides``: X/Y/Z cells.
* ``validate``: run-time checks against the model folders and the loaded checkpoint.

No WebUI or gradio imports. Images are PIL images.
"""

from .fields import (
    API_DEFAULTS,
    API_FIELDS,
    AXIS_FIELDS,
    COMBINE_MODES,
    CROP_POSITIONS,
    CUSTOM_LAYERS,
    FIELDS,
    IMAGE_WEIGHT_RANGE,
    LAYER_PRESET_CHOICES,
    LAYER_PRESETS,
    LAYER_WEIGHT_RANGE,
    MAX_LAYER_WEIGHTS,
    METHOD_OF_FAMILY,
    METHODS,
    OVERRIDABLE_FIELDS,
    PREPARATIONS,
    RESTORED_FIELDS,
    SPECS,
    UI_FIELDS,
    UNCOND_MODES,
    WEIGHT_RANGE,
    WEIGHTED,
    FieldSpec,
    field_docs,
    field_table_markdown,
)
from .infotext import expand_infotext, infotext_key, units_from_infotext, units_to_infotext, write_infotext
from .overrides import apply_overrides, axis_choices, parse_axis_value
from .parsers import API, INFOTEXT, MAX_IMAGES, UI, XYZ, norm_word
from .script_args import parse_script_args
from .unit import Unit
from .validate import (
    ADAPTER_FAMILIES,
    BASE_NAMES,
    ENCODER_HELP,
    ResolvedUnit,
    describe_need,
    required_encoders,
    validate_for_run,
)

__all__ = [
    "ADAPTER_FAMILIES", "API", "API_DEFAULTS", "API_FIELDS", "AXIS_FIELDS", "BASE_NAMES", "COMBINE_MODES",
    "CROP_POSITIONS", "CUSTOM_LAYERS", "ENCODER_HELP", "FIELDS", "IMAGE_WEIGHT_RANGE", "INFOTEXT",
    "LAYER_PRESETS", "LAYER_PRESET_CHOICES", "LAYER_WEIGHT_RANGE", "MAX_IMAGES", "MAX_LAYER_WEIGHTS",
    "METHODS", "METHOD_OF_FAMILY", "OVERRIDABLE_FIELDS", "PREPARATIONS", "RESTORED_FIELDS", "SPECS", "UI",
    "UI_FIELDS", "UNCOND_MODES", "WEIGHTED", "WEIGHT_RANGE", "XYZ", "FieldSpec", "ResolvedUnit", "Unit",
    "apply_overrides", "axis_choices", "describe_need", "expand_infotext", "field_docs", "field_table_markdown", "infotext_key",
    "norm_word", "parse_axis_value", "parse_script_args", "required_encoders", "units_from_infotext",
    "units_to_infotext", "validate_for_run", "write_infotext",
]
