"""The test-only oracles: independent implementations that numbers are compared with.

diffusers is not part of the WebUI's environment, so the WebUI-pins lane
(``bash tests/run.sh --webui-pins``, requirements-webui-pins.txt) does not install it and the
tests that need it skip there, saying why. In the main lane it is a requirement: a missing
oracle fails there instead of quietly skipping the parity tests.
"""
import importlib
import os

import pytest

PINS_LANE = os.environ.get("IDENTITY_WEBUI_PINS") == "1"


def diffusers():
    """The ``diffusers`` module; in the WebUI-pins lane, skip the calling test when it is absent."""
    if PINS_LANE:
        return pytest.importorskip(
            "diffusers", reason="needs diffusers, a test-only oracle the WebUI-pins lane does not install")
    return importlib.import_module("diffusers")
