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


INSTANTID_ONLY = {"ip_weight", "identitynet_weight", "identitynet_start", "identitynet_end", "pose_image", "pose_face", "uncond_noise",
                  "via_controlnet"}


def test_an_instantid_model_shows_its_two_weights_and_not_the_plain_weight():
    instantid = shown("instantid")
    assert INSTANTID_ONLY | {"face", "layer_preset", "mask"} <= instantid
    assert not {"weight", "s_scale", "lora_weight", "preparation", "uncond"} & instantid
    for other in ("ip-adapter", "faceid", "photomaker"):
        assert not INSTANTID_ONLY & shown(other), other
    assert "weight" in shown("ip-adapter") and "weight" in shown("faceid")


def test_a_photomaker_model_shows_its_controls_and_hides_the_image_token_knobs():
    from types import SimpleNamespace

    pm = shown("photomaker")
    assert {"trigger", "lora_weight", "preparation", "face"} <= pm
    assert not {"weight", "end", "combine", "layer_preset", "mask", "uncond", "s_scale"} & pm
    v1 = SimpleNamespace(family="photomaker", face_model=None, lora=True, params={})
    v2 = SimpleNamespace(family="photomaker", face_model="buffalo_l", lora=True, params={})
    assert not visible_fields("photomaker", {}, v1)["face"]  # V1 reads whole pictures only
    assert visible_fields("photomaker", {}, v2)["face"]
    assert "trigger" not in shown("faceid") and "trigger" not in shown("ip-adapter")


def test_picking_a_photomaker_model_moves_start_to_its_default_unless_the_user_set_it(monkeypatch):
    from lib_identity.webui import ui

    monkeypatch.setattr(ui, "method_of", lambda title: {"pm": "photomaker", "ip": "ip-adapter"}.get(title))
    assert ui.start_for_model("pm", 0.0) == 0.2
    assert ui.start_for_model("ip", 0.2) == 0.0  # back to the general default when leaving PhotoMaker
    assert ui.start_for_model("pm", 0.35) == 0.35 and ui.start_for_model("ip", 0.35) == 0.35
