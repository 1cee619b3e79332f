"""Live WebUI: the extension loads in a real AUTOMATIC1111 WebUI and leaves plain generation working.

Runs only when SD_WEBUI_ROOT is set (see tests/webui_live.py for the other SD_WEBUI_* variables).
"""

from webui_live import decode_images, small_payload, webui  # noqa: F401  (webui: the session fixture)


def test_extension_script_is_registered(webui):
    scripts = webui.get("/sdapi/v1/scripts")
    assert "identity" in scripts["txt2img"], scripts
    assert "identity" in scripts["img2img"], scripts


def test_txt2img_without_units_returns_the_requested_image(webui):
    result = webui.txt2img(small_payload(width=128, height=64))
    images = decode_images(result)
    assert len(images) == 1
    assert images[0].format == "PNG"
    assert images[0].size == (128, 64)
    info = result["info"]
    assert "Steps: 3" in info and "Seed: 1" in info, info
    # no Identity unit was asked for, so nothing of ours may appear in the parameters
    assert "Identity" not in info, info
