"""A stand-in for sd-webui-controlnet's ``internal_controlnet.external_code`` (v1.1.455), as its code behaves.

What it keeps of the real one (read in Mikubill/sd-webui-controlnet):

* ``Preprocessor`` (``scripts/supported_preprocessor.py``): a dataclass with ``name``, ``tags``,
  ``returns_image``; sliders as class attributes; a class-level registry by label and by name
  whose ``add_supported_preprocessor`` asserts that both are new; ``Result(value, display_images)``.
* ``ControlNetUnit`` (``internal_controlnet/args.py``): ``module`` must be registered, ``weight``
  0..2, guidance 0..1 with start <= end; for an enabled unit, ``processor_res`` and
  ``threshold_a/b`` outside their preprocessor's slider are reset to the slider's default;
  ``serialize()`` as its infotext writes it.
* ``get_all_units_in_processing(p)``: the units among the ControlNet script's args
  (``args_from:args_to``), dicts turned into units.
* ``update_cn_script_in_processing(p, units)``: pads to ``control_net_unit_count`` with disabled
  units and, when the count changes, moves ``args_from/args_to`` of ControlNet and every later
  script (the trap the bridge must avoid); assigns a new ``p.script_args``.
* ``get_models()``: titles "stem [hash]", the hash being the WebUI's old model hash.
"""

from __future__ import annotations

import copy
import hashlib
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, NamedTuple, Optional


def model_hash(path: str) -> str:
    """The WebUI's ``sd_models.model_hash``: sha256 of 64 KiB at 1 MiB, first 8 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        h.update(fh.read(0x10000))
    return h.hexdigest()[:8]


@dataclass
class PreprocessorParameter:
    label: str = "EMPTY_LABEL"
    minimum: float = 0.0
    maximum: float = 1.0
    step: float = 0.01
    value: float = 0.5
    visible: bool = True


@dataclass
class Preprocessor:
    name: str
    _label: str = None
    tags: List[str] = field(default_factory=list)
    slider_resolution = PreprocessorParameter(label="Resolution", minimum=64, maximum=2048, value=512, step=8)
    slider_1 = PreprocessorParameter(visible=False)
    slider_2 = PreprocessorParameter(visible=False)
    slider_3 = PreprocessorParameter(visible=False)
    returns_image: bool = True
    sorting_priority = 0
    model: Optional[Any] = None
    preprocessor_deps: List[str] = field(default_factory=list)

    all_processors: ClassVar[Dict[str, "Preprocessor"]] = {}
    all_processors_by_name: ClassVar[Dict[str, "Preprocessor"]] = {}

    class Result(NamedTuple):
        value: Any
        display_images: List[Any]

    @property
    def label(self) -> str:
        return self._label if self._label is not None else self.name

    @classmethod
    def add_supported_preprocessor(cls, p):
        assert p.label not in cls.all_processors, f"{p.label} already registered!"
        cls.all_processors[p.label] = p
        assert p.name not in cls.all_processors_by_name, f"{p.name} already registered!"
        cls.all_processors_by_name[p.name] = p

    @classmethod
    def get_preprocessor(cls, name):
        return cls.all_processors.get(name, cls.all_processors_by_name.get(name, None))

    def cached_call(self, input_image, *args, **kwargs):
        result = self(input_image, *args, **kwargs)
        if isinstance(result, Preprocessor.Result):
            return result
        return Preprocessor.Result(value=result, display_images=[result if self.returns_image else input_image])

    def __call__(self, input_image, resolution, slider_1=None, slider_2=None, slider_3=None, input_mask=None, **kw):
        raise NotImplementedError


class _Builtin(Preprocessor):
    def __init__(self, name, returns_image=True):
        super().__init__(name=name, tags=["Instant-ID"] if "instant" in name else [])
        self.returns_image = returns_image


class ControlNetUnit:
    FIELDS = dict(enabled=False, module="none", model="None", weight=1.0, image=None, mask=None,
                  resize_mode="Crop and Resize", low_vram=False, processor_res=-1, threshold_a=-1.0, threshold_b=-1.0,
                  guidance_start=0.0, guidance_end=1.0, pixel_perfect=False, control_mode="Balanced",
                  save_detected_map=True, hr_option="Both", advanced_weighting=None, effective_region_mask=None)
    INFOTEXT = ("module", "model", "weight", "resize_mode", "processor_res", "threshold_a", "threshold_b",
                "guidance_start", "guidance_end", "pixel_perfect", "control_mode")

    def __init__(self, **values):
        for k, v in self.FIELDS.items():
            setattr(self, k, copy.copy(values.get(k, v)))
        if Preprocessor.get_preprocessor(self.module) is None:
            raise ValueError(f"module({self.module}) not found in supported modules.")
        if not 0.0 <= self.weight <= 2.0:
            raise ValueError(f"weight {self.weight} not in 0..2")
        if not (0.0 <= self.guidance_start <= 1.0 and 0.0 <= self.guidance_end <= 1.0):
            raise ValueError("guidance out of 0..1")
        if self.guidance_start > self.guidance_end:
            raise ValueError(f"guidance_start({self.guidance_start}) > guidance_end({self.guidance_end})")
        if self.enabled:
            pre = Preprocessor.get_preprocessor(self.module)
            for attr, slider in (("processor_res", "slider_resolution"), ("threshold_a", "slider_1"),
                                 ("threshold_b", "slider_2")):
                cfg = getattr(pre, slider)
                if not cfg.minimum <= getattr(self, attr) <= cfg.maximum:
                    setattr(self, attr, cfg.value)

    @classmethod
    def from_dict(cls, values: dict):
        return cls(**values)

    def serialize(self) -> str:
        return ", ".join(f"{' '.join(w.capitalize() for w in f.split('_'))}: {getattr(self, f)}" for f in self.INFOTEXT)


class Script:
    """An AlwaysOn script of the runner: a title and its slice of the args."""

    def __init__(self, title, args_from, args_to):
        self._title, self.args_from, self.args_to = title, args_from, args_to

    def title(self):
        return self._title


def install(monkeypatch, *, model_files=(), with_instant_id=True, unit_count=3):
    """Put the stand-in into ``sys.modules`` as the real extension is found; returns the module.

    ``model_files``: paths the extension lists (its model folders' files).
    """
    Preprocessor.all_processors.clear()
    Preprocessor.all_processors_by_name.clear()
    builtins = ["none", "canny"] + (["instant_id_face_embedding", "instant_id_face_keypoints"] if with_instant_id else [])
    for name in builtins:
        Preprocessor.add_supported_preprocessor(_Builtin(name, returns_image=name != "instant_id_face_embedding"))
    ec = types.ModuleType("internal_controlnet.external_code")
    ec.Preprocessor, ec.PreprocessorParameter, ec.ControlNetUnit = Preprocessor, PreprocessorParameter, ControlNetUnit
    ec.unit_count = unit_count
    ec.get_api_version = lambda: 3
    titles = [f"{os.path.splitext(os.path.basename(f))[0]} [{model_hash(f)}]" for f in model_files]
    ec.get_models = lambda update=False: list(titles)

    def find_cn_script(runner):
        return next((s for s in runner.alwayson_scripts if s.title().lower() == "controlnet"), None)

    def get_all_units_in_processing(p):
        cn = find_cn_script(p.scripts)
        if cn is None:
            return []
        args = p.script_args[cn.args_from:cn.args_to]
        return [ControlNetUnit.from_dict(a) if isinstance(a, dict) else a for a in args
                if isinstance(a, (dict, ControlNetUnit))]

    def update_cn_script_in_processing(p, cn_units, **_kw):
        cn = find_cn_script(p.scripts)
        if cn is None or len(p.script_args) < cn.args_from:
            return
        units = list(cn_units) + [ControlNetUnit(enabled=False)] * max(ec.unit_count - len(cn_units), 0)
        args = list(p.script_args)
        diff = 0
        for script in p.scripts.alwayson_scripts:
            if script is cn:
                diff = len(units) - (cn.args_to - cn.args_from)
                args[script.args_from:script.args_to] = units
                script.args_to = script.args_from + len(units)
            else:
                script.args_from += diff
                script.args_to += diff
        p.script_args = tuple(args)

    ec.find_cn_script = find_cn_script
    ec.get_all_units_in_processing = get_all_units_in_processing
    ec.update_cn_script_in_processing = update_cn_script_in_processing
    monkeypatch.setitem(sys.modules, "internal_controlnet.external_code", ec)
    return ec
