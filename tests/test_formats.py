"""Every official layout is read from both containers and recognised; bad files are refused plainly."""

import os
import pickle
import zipfile

import pytest
import torch

from checkpoints import (
    LAYOUT_MANIFESTS,
    manifest,
    manifest_keys,
    nest,
    write_layout,
    write_manifest_layout,
    write_random,
)
from lib_identity import formats
from lib_identity.errors import CheckpointError

# What a user should be told for each official file (family, variant, base, encoder, tokens, projection, LoRA rank).
EXPECTED = {
    "ip-adapter_sd15": ("ip-adapter", "ip-adapter_sd15", "sd15", "clip-vit-h", 4, "linear", None),
    "ip-adapter_sd15_light": ("ip-adapter", "ip-adapter_sd15_light", "sd15", "clip-vit-h", 4, "linear", None),
    "ip-adapter_sd15_vit-G": ("ip-adapter", "ip-adapter_sd15_vit-G", "sd15", "clip-vit-bigg", 4, "linear", None),
    "ip-adapter_sdxl": ("ip-adapter", "ip-adapter_sdxl", "sdxl", "clip-vit-bigg", 4, "linear", None),
    "ip-adapter_sdxl_vit-h": ("ip-adapter", "ip-adapter_sdxl_vit-h", "sdxl", "clip-vit-h", 4, "linear", None),
    "ip-adapter-plus_sd15": ("ip-adapter", "ip-adapter-plus_sd15", "sd15", "clip-vit-h", 16, "resampler", None),
    "ip-adapter-plus-face_sd15": ("ip-adapter", "ip-adapter-plus-face_sd15", "sd15", "clip-vit-h", 16, "resampler", None),
    "ip-adapter-plus_sdxl_vit-h": ("ip-adapter", "ip-adapter-plus_sdxl_vit-h", "sdxl", "clip-vit-h", 16, "resampler", None),
    "ip-adapter-plus-face_sdxl_vit-h": ("ip-adapter", "ip-adapter-plus-face_sdxl_vit-h", "sdxl", "clip-vit-h", 16, "resampler", None),
    "ip-adapter-full-face_sd15": ("ip-adapter", "ip-adapter-full-face_sd15", "sd15", "clip-vit-h", 257, "mlp", None),
    "ip-adapter-faceid_sd15": ("ip-adapter-faceid", "ip-adapter-faceid_sd15", "sd15", "insightface", 4, "faceid-mlp", 128),
    "ip-adapter-faceid_sdxl": ("ip-adapter-faceid", "ip-adapter-faceid_sdxl", "sdxl", "insightface", 4, "faceid-mlp", 128),
    "ip-adapter-faceid-plus_sd15": ("ip-adapter-faceid", "ip-adapter-faceid-plus_sd15", "sd15", "insightface+clip-vit-h", 4, "faceid-plus", 128),
    "ip-adapter-faceid-plusv2_sd15": ("ip-adapter-faceid", "ip-adapter-faceid-plusv2_sd15", "sd15", "insightface+clip-vit-h", 4, "faceid-plus", 128),
    "ip-adapter-faceid-plusv2_sdxl": ("ip-adapter-faceid", "ip-adapter-faceid-plusv2_sdxl", "sdxl", "insightface+clip-vit-h", 4, "faceid-plus", 128),
    "ip-adapter-faceid-portrait_sd15": ("ip-adapter-faceid", "ip-adapter-faceid-portrait_sd15", "sd15", "insightface", 16, "faceid-mlp", None),
    "ip-adapter-faceid-portrait_sdxl": ("ip-adapter-faceid", "ip-adapter-faceid-portrait_sdxl", "sdxl", "insightface", 16, "faceid-mlp", None),
    "instantid_ip-adapter": ("instantid-adapter", "instantid-adapter_sdxl", "sdxl", "insightface", 16, "instantid-resampler", None),
    "instantid_controlnet": ("instantid-identitynet", "instantid-identitynet_sdxl", "sdxl", "insightface", None, "controlnet", None),
    "photomaker-v1": ("photomaker", "photomaker-v1", "sdxl", "clip-vit-l(embedded)", 1, "photomaker-v1", 64),
    "photomaker-v2": ("photomaker", "photomaker-v2", "sdxl", "clip-vit-l(embedded)+insightface", 2, "photomaker-v2", 64),
    "clip_vision_vit-h": ("clip-vision", "clip-vit-h", None, "clip-vit-h", None, None, None),
    "clip_vision_vit-bigG": ("clip-vision", "clip-vit-bigg", None, "clip-vit-bigg", None, None, None),
}


def test_every_layout_manifest_has_an_expectation():
    assert sorted(EXPECTED) == sorted(LAYOUT_MANIFESTS)
    assert len(LAYOUT_MANIFESTS) == 23  # + the two attention-order tables = the 25 manifests


@pytest.mark.parametrize("container", ["safetensors", "bin"])
@pytest.mark.parametrize("name", LAYOUT_MANIFESTS)
def test_official_layout_is_recognised(tmp_path, name, container):
    path = write_manifest_layout(name, tmp_path, container)
    info = formats.inspect(path)
    family, variant, base, encoder, tokens, projection, rank = EXPECTED[name]
    got = (info.family, info.variant, info.base, info.image_encoder, info.tokens, info.projection, info.lora_rank)
    assert got == (family, variant, base, encoder, tokens, projection, rank)
    m = manifest(name)
    # cross-check against the manifest's own facts, which were gathered independently of this code
    assert info.key_count == len(m["keys"])
    if m.get("base_model"):
        assert info.base == m["base_model"]
    if isinstance(m.get("num_tokens"), int):
        assert info.tokens == m["num_tokens"]
    if m.get("lora_rank"):
        assert info.lora and info.lora_rank == m["lora_rank"]
    else:
        assert not info.lora
    assert info.container == container


def test_layout_reading_does_not_load_tensor_data(tmp_path, monkeypatch):
    path = write_manifest_layout("ip-adapter_sdxl", tmp_path, "safetensors")
    import safetensors.torch

    def boom(*a, **k):  # a listing must never read all tensors
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(safetensors.torch, "load_file", boom)
    assert formats.inspect(path).variant == "ip-adapter_sdxl"


@pytest.mark.parametrize("container", ["safetensors", "bin"])
def test_random_weight_official_file_loads_grouped_by_section(tmp_path, container):
    keys = manifest_keys("ip-adapter-plus_sd15")
    written = write_random(keys, tmp_path / f"ip-adapter-plus_sd15.{container}", dtype=torch.float16)
    sections = formats.load_tensors(tmp_path / f"ip-adapter-plus_sd15.{container}")
    assert set(sections) == {"image_proj", "ip_adapter"}
    flat = {f"{s}.{k}": v for s, d in sections.items() for k, v in d.items()}
    assert flat.keys() == written.keys()
    for k, t in written.items():
        assert torch.equal(flat[k], t), k


def test_safetensors_layer_keys_are_ordered_as_integers(tmp_path):
    path = write_manifest_layout("ip-adapter_sd15", tmp_path, "safetensors")
    with open(path, "rb") as fh:  # the file itself is in string order: 1, 11, 13, ...
        header = fh.read(4000).decode("latin1")
    assert header.index('"ip_adapter.11.') < header.index('"ip_adapter.3.')
    ip = formats.read_layout(path).section("ip_adapter")
    assert formats.ip_layer_indices(ip) == list(range(1, 32, 2))


def test_instantid_bare_top_level_sub_dicts(tmp_path):
    """InstantID's loader also takes the image_proj and ip_adapter contents merged at the top level."""
    keys = manifest_keys("instantid_ip-adapter")
    bare = {k.split(".", 1)[1]: v for k, v in keys.items()}
    path = write_layout(bare, tmp_path / "ip-adapter.bin", dtype=torch.float32, nested=False)
    info = formats.inspect(path)
    assert (info.family, info.tokens, info.params["embedding_dim"]) == ("instantid-adapter", 16, 512)


def test_legacy_adapter_modules_prefix(tmp_path):
    keys = {k.replace("ip_adapter.", "adapter_modules.", 1): v for k, v in manifest_keys("ip-adapter_sd15").items()}
    path = write_layout(keys, tmp_path / "old.bin")
    assert formats.inspect(path).variant == "ip-adapter_sd15"


def test_identitynet_diffusers_folder(tmp_path):
    import json

    folder = tmp_path / "InstantID" / "ControlNetModel"
    write_layout(manifest_keys("instantid_controlnet"), folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(manifest("instantid_controlnet")["diffusers_config"]))
    info = formats.inspect(folder)
    assert info.family == "instantid-identitynet" and info.container == "diffusers-folder"
    assert info.params["config"]["cross_attention_dim"] == 2048
    assert "names InstantID" in info.hints[0]


def test_identitynet_in_ldm_naming(tmp_path):
    keys = {k: tuple(v) for k, v in manifest("instantid_controlnet")["ldm_keys"].items()}
    info = formats.inspect(write_layout(keys, tmp_path / "control_instant_id_sdxl.safetensors"))
    assert info.family == "instantid-identitynet" and info.params["naming"] == "ldm"


def test_name_hints_choose_between_identical_layouts(tmp_path):
    keys = manifest_keys("ip-adapter-faceid-plus_sd15")
    v1 = formats.inspect(write_layout(keys, tmp_path / "ip-adapter-faceid-plus_sd15.bin"))
    v2 = formats.inspect(write_layout(keys, tmp_path / "ip-adapter-faceid-plusv2_sd15.bin"))
    assert (v1.params["shortcut"], v2.params["shortcut"]) == (False, True)
    assert all("identical on disk" in i.hints[0] for i in (v1, v2))
    face = formats.inspect(write_layout(manifest_keys("ip-adapter-plus_sd15"), tmp_path / "my-plus-face.safetensors"))
    assert face.variant == "ip-adapter-plus-face_sd15" and "share one layout" in face.hints[0]
    # the file name alone never makes a file something it is not
    renamed = formats.inspect(write_layout(manifest_keys("ip-adapter_sdxl"), tmp_path / "ip-adapter-plus-face_sd15.bin"))
    assert renamed.variant == "ip-adapter_sdxl"


# Files people keep in folders named after what they are for: the folder never decides.
FOLDER_NAMES_THAT_DECIDE_NOTHING = [
    ("ip-adapter_sd15", "highlights/ip-adapter_sd15.safetensors", "ip-adapter_sd15"),
    ("ip-adapter_sd15", "light/v11/ip-adapter_sd15.bin", "ip-adapter_sd15"),
    ("ip-adapter-plus_sd15", "faceswap/ip-adapter-plus_sd15.safetensors", "ip-adapter-plus_sd15"),
    ("ip-adapter-faceid-plus_sd15", "v2/ip-adapter-faceid-plus_sd15.bin", "ip-adapter-faceid-plus_sd15"),
    ("ip-adapter-faceid-portrait_sd15", "portrait-v11/ip-adapter-faceid-portrait_sd15.bin",
     "ip-adapter-faceid-portrait_sd15"),
    ("instantid_ip-adapter", "portraits/InstantID/ip-adapter.bin", "instantid-adapter_sdxl"),
    # a diffusers-style folder: its own name counts, the folders above it do not
    ("ip-adapter-plus_sd15", "faceswap/ip-adapter-plus_sd15/model.safetensors", "ip-adapter-plus_sd15"),
    ("ip-adapter-plus_sd15", "models/ip-adapter-plus-face_sd15/model.safetensors", "ip-adapter-plus-face_sd15"),
]


@pytest.mark.parametrize("layout,where,variant", FOLDER_NAMES_THAT_DECIDE_NOTHING)
def test_only_the_checkpoints_own_name_chooses_between_identical_layouts(tmp_path, layout, where, variant):
    path = write_layout(manifest_keys(layout), tmp_path / where, dtype=torch.float32)
    target = path.parent if path.name == "model.safetensors" else path
    info = formats.inspect(target)
    assert info.variant == variant
    if layout == "instantid_ip-adapter":  # not FaceID portrait: InstantID's own face pack
        assert (info.family, info.face_model) == ("instantid-adapter", "antelopev2")
    if layout == "ip-adapter-faceid-plus_sd15":
        assert info.params["shortcut"] is False


@pytest.mark.parametrize("name", ["ip-adapter-plus_face_sd15", "ip-adapter-plus-face_sd15", "ip-adapter-plusface_sd15",
                                  "IP-Adapter-Face-Plus_sd15", "my plus face"])
def test_plus_face_is_chosen_by_the_names_people_use(tmp_path, name):
    info = formats.inspect(write_layout(manifest_keys("ip-adapter-plus_sd15"), tmp_path / "plus" / f"{name}.safetensors"))
    assert info.variant == "ip-adapter-plus-face_sd15"


@pytest.mark.parametrize("name,variant", [
    ("ip-adapter_sd15_light_v11.bin", "ip-adapter_sd15_light_v11"),
    ("ip-adapter-faceid-plusv2_sd15.bin", "ip-adapter-faceid-plusv2_sd15"),
    ("ip-adapter-faceid-portrait-v11_sd15.bin", "ip-adapter-faceid-portrait-v11_sd15"),
    ("ip-adapter-faceid-portrait-unnorm_sdxl.bin", "ip-adapter-faceid-portrait-unnorm_sdxl"),
])
def test_hints_in_the_file_name_still_decide(tmp_path, name, variant):
    layout = {"ip-adapter_sd15_light_v11.bin": "ip-adapter_sd15", "ip-adapter-faceid-plusv2_sd15.bin": "ip-adapter-faceid-plus_sd15",
              "ip-adapter-faceid-portrait-v11_sd15.bin": "ip-adapter-faceid-portrait_sd15",
              "ip-adapter-faceid-portrait-unnorm_sdxl.bin": "instantid_ip-adapter"}[name]
    assert formats.inspect(write_layout(manifest_keys(layout), tmp_path / "models" / name)).variant == variant


# ---------------------------------------------------------------- safety and bad files


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = str(tmp_path / "payload-ran")
    path = tmp_path / "evil.bin"
    torch.save({"image_proj": {"proj.weight": torch.zeros(2, 2)}, "ip_adapter": _Payload(marker)}, str(path))
    # the file really carries the payload: an unrestricted unpickler would run it
    with zipfile.ZipFile(path) as z:
        assert any(b"mkdir" in z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
    with pytest.raises(CheckpointError) as e:
        formats.inspect(path)
    assert "refused" in str(e.value) and "evil.bin" in str(e.value)
    # the message names what the pickle asked to run (posix.mkdir or nt.mkdir), as torch reported it
    assert "mkdir)" in str(e.value)
    with pytest.raises(CheckpointError):
        formats.load_tensors(path)
    assert not os.path.exists(marker)


def test_legacy_pickle_payload_is_refused(tmp_path):
    marker = str(tmp_path / "payload-ran")
    path = tmp_path / "old.pth"
    torch.save({"x": _Payload(marker)}, str(path), _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="refused"):
        formats.inspect(path)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("cut", [4, "half"])
def test_truncated_safetensors(tmp_path, cut):
    """A download that stopped a few bytes short is reported by our own length check, with both
    sizes, when the file is listed and when it is loaded."""
    path = tmp_path / "ip-adapter_sd15.safetensors"
    write_random(manifest_keys("ip-adapter_sd15"), path, dtype=torch.float16)
    size = path.stat().st_size
    short = size // 2 if cut == "half" else size - cut
    with open(path, "r+b") as fh:
        fh.truncate(short)
    for read in (formats.inspect, formats.load_tensors):
        with pytest.raises(CheckpointError) as raised:
            read(path)
        assert f"the file is truncated: {short} bytes on disk, its header describes {size}" in str(raised.value)


def test_truncated_bin(tmp_path):
    path = tmp_path / "ip-adapter_sd15.bin"
    write_random(manifest_keys("ip-adapter_sd15"), path, dtype=torch.float16)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        formats.inspect(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_garbage_and_empty_files(tmp_path, suffix):
    path = tmp_path / ("garbage" + suffix)
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as e:
        formats.inspect(path)
    assert str(path) in str(e.value)
    empty = tmp_path / ("empty" + suffix)
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        formats.inspect(empty)


def test_not_an_identity_checkpoint(tmp_path):
    path = tmp_path / "sd.safetensors"
    write_random({"model.diffusion_model.out.0.weight": (4,), "first_stage_model.x": (2, 2)}, path)
    with pytest.raises(CheckpointError, match="not an identity checkpoint"):
        formats.inspect(path)


def test_pickle_of_non_tensors_is_explained(tmp_path):
    path = tmp_path / "list.bin"
    torch.save({"image_proj": [1, 2, 3]}, str(path))
    with pytest.raises(CheckpointError, match="not tensors"):
        formats.inspect(path)


def test_missing_layer_is_named(tmp_path):
    keys = {k: v for k, v in manifest_keys("ip-adapter_sd15").items() if not k.startswith("ip_adapter.13.")}
    with pytest.raises(CheckpointError, match=r"15 cross-attention layers, SD15 has 16; missing e.g. \[13\]"):
        formats.inspect(write_layout(keys, tmp_path / "cut.safetensors"))


def test_wrong_context_width(tmp_path):
    keys = {k: ((v[0], 1024) if "to_" in k else v) for k, v in manifest_keys("ip-adapter_sd15").items()}
    with pytest.raises(CheckpointError, match="neither SD1.5"):
        formats.inspect(write_layout(keys, tmp_path / "sd2.safetensors"))


def test_unpickling_error_type_is_not_leaked(tmp_path):
    path = tmp_path / "raw.bin"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError):
        formats.inspect(path)


def test_nest_helper_round_trip():
    flat = {"image_proj.proj.weight": 1, "ip_adapter.1.to_k_ip.weight": 2}
    assert nest(flat) == {"image_proj": {"proj.weight": 1}, "ip_adapter": {"1.to_k_ip.weight": 2}}
