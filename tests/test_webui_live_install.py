"""Live WebUI venv: install.py, run as the WebUI runs extension installers, adds insightface and
onnxruntime, moves none of the WebUI's pins, and installs nothing the second time.

Runs only when SD_WEBUI_ROOT is set (SD_WEBUI_PYTHON names the WebUI's python). It really installs
into that venv (see tests/webui_installer.py).
"""

from webui_installer import describe, imports_ok, installer_runs, webui_python  # noqa: F401  (fixture)

# what the WebUI pins and a careless install would move (names as pip normalises them)
WEBUI_PINS = ("torch", "torchvision", "gradio", "transformers", "pydantic", "numpy", "protobuf", "opencv-python",
              "pillow", "safetensors", "fastapi", "setuptools", "scipy", "scikit-image")
ONNXRUNTIMES = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")


def test_the_installer_runs_and_the_face_packages_import(installer_runs):
    assert installer_runs.first.returncode == 0, describe(installer_runs.first)
    check = imports_ok(webui_python(), (
        "import insightface, onnxruntime, onnx\n"
        "from insightface import model_zoo\n"
        "from insightface.app.common import Face\n"
        "from insightface.utils import face_align\n"
        "print(insightface.__version__, onnxruntime.__version__, onnxruntime.get_available_providers())"))
    assert check.returncode == 0, check.stderr[-4000:]
    assert "CPUExecutionProvider" in check.stdout
    after = installer_runs.after_first
    assert "insightface" in after and "onnx" in after
    # exactly one onnxruntime build (two would fight over the same module)
    assert [d for d in ONNXRUNTIMES if d in after] in (["onnxruntime"], ["onnxruntime-gpu"]), after


def test_the_webui_pins_and_everything_installed_before_are_unchanged(installer_runs):
    before, after = installer_runs.before, installer_runs.after_first
    for name in WEBUI_PINS:
        assert name in before, f"{name} is not in the WebUI venv's pip freeze: {sorted(before)}"
    moved = {name: (version, after.get(name)) for name, version in before.items() if after.get(name) != version}
    assert moved == {}, f"install.py changed or removed: {moved}\n{describe(installer_runs.first)}"


def test_a_second_run_installs_nothing(installer_runs):
    second = installer_runs.second
    assert second.returncode == 0, describe(second)
    assert "Installing" not in second.stdout, describe(second)
    assert installer_runs.after_second == installer_runs.after_first
