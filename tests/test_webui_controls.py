"""Which of a unit's controls the accordion shows: those the chosen model's method uses, and the
dependent ones only while the control they depend on asks for them (no gradio needed)."""

from lib_identity import units as U
from lib_identity.webui.ui import visible_fields


def shown(method, **values):
    return {name for name, on in visible_fields(method, values).items() if on}


def test_a_faceid_model_shows_the_face_controls_and_hides_the_clip_ones():
    faceid = shown("faceid")
    assert {"face", "s_scale", "lora_weight", "layer_preset", "mask"} <= faceid
    assert not {"preparation", "crop_position", "uncond", "negative_image"} & faceid


def test_an_ip_adapter_model_hides_the_face_controls():
    ip = shown("ip-adapter")
    assert {"preparation", "crop_position", "uncond", "layer_preset"} <= ip
    assert not {"face", "s_scale", "lora_weight"} & ip


def test_dependent_controls_follow_their_control():
    assert "crop_position" not in shown("ip-adapter", preparation="pad")
    assert "image_weights" in shown("ip-adapter", combine=U.WEIGHTED)
    assert "layer_weights" in shown(None, layer_preset=U.CUSTOM_LAYERS)
    assert "negative_image" not in shown("faceid", uncond="image")  # FaceID has no negative picture


def test_without_a_model_every_control_shows_that_its_dependencies_allow():
    assert shown(None) == {s.name for s in U.FIELDS if s.methods != U.METHODS or s.visible_if} - {
        s.name for s in U.FIELDS if s.visible_if and U.SPECS[s.visible_if[0]].default != s.visible_if[1]}


INSTANTID_ONLY = {"ip_weight", "identitynet_weight", "identitynet_start", "identitynet_end", "pose_image", "uncond_noise",
                  "via_controlnet"}


def test_an_instantid_model_shows_its_two_weights_and_not_the_plain_weight():
    instantid = shown("instantid")
    assert INSTANTID_ONLY | {"face", "layer_preset", "mask"} <= instantid
    assert not {"weight", "s_scale", "lora_weight", "preparation", "uncond"} & instantid
    for other in ("ip-adapter", "faceid", "photomaker"):
        assert not INSTANTID_ONLY & shown(other) and "weight" in shown(other), other
