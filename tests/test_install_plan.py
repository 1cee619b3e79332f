"""install.py's decisions for face analysis, without a network: given the installed packages, what pip would run."""

import importlib.util
import os
import sys
import types

import pytest

from lib_identity.install_plan import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# what a WebUI 1.10.1 venv holds that matters here (seen in a real one)
WEBUI = {
    "numpy": "1.26.2", "protobuf": "3.20.0", "scikit-image": "0.21.0", "scipy": "1.11.4",
    "opencv-python": "4.8.0.76", "requests": "2.31.0", "tqdm": "4.66.1", "torch": "2.1.2+cu121",
    "Pillow": "9.5.0", "packaging": "23.2", "sympy": "1.12", "typing_extensions": "4.8.0",
}


def _names(commands):
    return [[a for a in c[1:] if not a.startswith("-")][0] for c in commands]


def test_a_fresh_webui_gets_insightface_onnx_and_the_gpu_runtime():
    commands = plan(WEBUI, cuda=True)
    assert _names(commands) == ["onnx==1.18.0", "onnxruntime-gpu", "insightface==2.1"]
    assert commands[0] == ["install", "--no-deps", "onnx==1.18.0"]  # its metadata would pull protobuf>=4.25.1
    assert commands[2] == ["install", "--no-deps", "insightface==2.1"]  # its metadata asks for the GUI opencv
    runtime = commands[1]
    # the runtime's dependencies are resolved with the WebUI's versions held exactly: nothing moves
    for held in ("numpy==1.26.2", "protobuf==3.20.0", "torch==2.1.2+cu121", "opencv-python==4.8.0.76",
                 "scikit-image==0.21.0", "pillow==9.5.0"):
        assert held in runtime
    for c in commands:
        assert "-U" not in c and "--upgrade" not in c
        assert not any(a in ("numpy", "protobuf", "opencv-python") for a in c)  # never an unpinned pinned package


def test_without_cuda_the_cpu_runtime():
    assert _names(plan(WEBUI, cuda=False))[1] == "onnxruntime"


@pytest.mark.parametrize("runtime", ["onnxruntime", "onnxruntime-gpu", "onnxruntime_directml", "OnnxRuntime-GPU"])
def test_an_installed_runtime_is_kept_and_never_joined_by_another(runtime):
    asked = []
    commands = plan(dict(WEBUI, **{runtime: "1.17.1"}), cuda=lambda: asked.append(1) or True)
    assert not any("onnxruntime" in a for c in commands for a in c)
    assert asked == []  # torch is not even asked about CUDA


def test_nothing_when_everything_is_there():
    full = dict(WEBUI, insightface="0.7.3", onnx="1.14.0", onnxruntime="1.16.3")
    assert plan(full, cuda=True) == []


def test_missing_modules_insightface_imports_are_added_with_the_pins_held():
    env = {k: v for k, v in WEBUI.items() if k not in ("scikit-image", "tqdm", "opencv-python", "typing_extensions")}
    commands = plan(env, cuda=False)
    names = _names(commands)
    assert names[0] == "onnx==1.18.0"
    assert set(names[1:5]) == {"scikit-image", "opencv-python-headless", "tqdm", "typing-extensions"}
    assert names[5:] == ["onnxruntime", "insightface==2.1"]
    skimage = commands[names.index("scikit-image")]
    assert "numpy==1.26.2" in skimage and "scipy==1.11.4" in skimage and "protobuf==3.20.0" in skimage
    # a headless opencv counts as opencv
    assert "opencv-python-headless" not in _names(plan(dict(WEBUI, **{"opencv-python-headless": "4.9.0.80"}), False))


def _load_install_py():
    spec = importlib.util.spec_from_file_location("identity_install_script", os.path.join(ROOT, "install.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_py_runs_the_plan_through_the_webuis_pip(monkeypatch):
    calls = []
    launch = types.ModuleType("launch")
    launch.run_pip = lambda command, desc: calls.append((command, desc))
    monkeypatch.setitem(sys.modules, "launch", launch)
    script = _load_install_py()
    monkeypatch.setattr(script, "installed_distributions", lambda: dict(WEBUI, onnxruntime="1.16.3"))
    script.main()
    assert calls == [
        ("install --no-deps onnx==1.18.0", "sd-webui-identity requirement: onnx==1.18.0"),
        ("install --no-deps insightface==2.1", "sd-webui-identity requirement: insightface==2.1"),
    ]
    calls.clear()
    monkeypatch.setattr(script, "installed_distributions", lambda: dict(WEBUI, onnxruntime="1", onnx="1", insightface="2.1"))
    monkeypatch.delitem(sys.modules, "launch")  # with nothing to do the WebUI's launch module is not needed
    script.main()
    assert calls == []
