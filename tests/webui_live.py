"""Run a real AUTOMATIC1111 WebUI with this checkout as an extension, for live API tests.

Nothing here runs unless the environment names a WebUI:

SD_WEBUI_ROOT        the WebUI checkout (the folder with launch.py). Unset: live tests skip.
SD_WEBUI_PYTHON      the WebUI's python (default: SD_WEBUI_ROOT/venv/bin/python).
SD_WEBUI_MODELS_DIR  its models folder, with Stable-diffusion/ inside (default: SD_WEBUI_ROOT/models).
SD_WEBUI_CHECKPOINT  checkpoint title or file name to start with (default: the WebUI's own choice).
SD_WEBUI_ARGS        extra launch.py arguments, shell-quoted (e.g. "--use-cpu all --precision full --no-half").
SD_WEBUI_HF_HOME     a Hugging Face cache for the WebUI; sets HF_HOME and the offline flags for it alone.
SD_WEBUI_EXTRA_EXTENSIONS  more extension folders to link in (os.pathsep-separated), e.g. ControlNet.
SD_WEBUI_STARTUP_TIMEOUT   seconds to wait for the API (default 600).
SD_WEBUI_REQUEST_TIMEOUT   seconds to wait for one API request (default 600; SDXL on the CPU needs more).

The server never touches SD_WEBUI_ROOT's own settings or extensions: it runs with a temporary
--data-dir whose extensions/ folder holds a link to this checkout, API only, on a free loopback port.

Use from a test module::

    from webui_live import webui  # noqa: F401  (the session-scoped fixture)

    def test_something(webui):
        result = webui.txt2img(small_payload(prompt="a cat"))
        image = decode_images(result)[0]
"""

from __future__ import annotations

import base64
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
EXTENSION_DIR_NAME = "sd-webui-identity"
LOG_TAIL_CHARS = 6000

# Every launch: no installs, no downloads, no network but loopback.
BASE_ARGS = [
    "--skip-prepare-environment",
    "--skip-install",
    "--skip-torch-cuda-test",
    "--skip-version-check",
    "--no-download-sd-model",
    "--api",
    "--nowebui",
    "--server-name",
    "127.0.0.1",
]


def skip_reason() -> str | None:
    """Why live WebUI tests cannot run here, or None when SD_WEBUI_ROOT names a WebUI."""
    root = os.environ.get("SD_WEBUI_ROOT")
    if not root:
        return "live WebUI tests need SD_WEBUI_ROOT (a stable-diffusion-webui checkout); it is not set"
    return None


def small_payload(**overrides) -> dict:
    """A txt2img request that is cheap on a CPU: 64x64, 3 Euler steps, fixed seed."""
    payload = {
        "prompt": "a photo of a person",
        "negative_prompt": "",
        "width": 64,
        "height": 64,
        "steps": 3,
        "sampler_name": "Euler",
        "cfg_scale": 5,
        "seed": 1,
        "batch_size": 1,
        "n_iter": 1,
    }
    payload.update(overrides)
    return payload


def decode_images(result: dict) -> list:
    """The PIL images of a txt2img/img2img API response."""
    from PIL import Image

    return [Image.open(io.BytesIO(base64.b64decode(b64))) for b64 in result["images"]]


def with_units(*units, **overrides) -> dict:
    """``small_payload(**overrides)`` with these identity units (API dicts) in ``alwayson_scripts``."""
    payload = small_payload(**overrides)
    payload["alwayson_scripts"] = {"identity": {"args": list(units)}}
    return payload


def pixel_digest(result: dict, index: int = 0) -> str:
    """A hash of one response image's decoded RGB pixels. Not of its PNG bytes: those also hold the
    infotext, which differs whenever the units do, so two PNGs differ even when the pixels are equal."""
    import hashlib

    return hashlib.sha256(decode_images(result)[index].convert("RGB").tobytes()).hexdigest()


# Random-weight identity models the live tests use, in the official layouts, written at start.
LIVE_MODELS = {
    # name -> (manifest, real random tensors or a sparse layout-only file)
    "ip-adapter_sd15.safetensors": ("ip-adapter_sd15", "random"),
    "ip-adapter-plus_sd15.safetensors": ("ip-adapter-plus_sd15", "random"),
    "clip_vision/CLIP-ViT-H-14.safetensors": ("clip_vision_vit-h", "random"),
    "ip-adapter_sdxl.safetensors": ("ip-adapter_sdxl", "layout"),  # wrong base for an SD1.5 checkpoint
    "ip-adapter_sd15_vit-G.safetensors": ("ip-adapter_sd15_vit-G", "layout"),  # its ViT-bigG encoder is missing
    # FaceID as published (.bin, float16, rank-128 LoRA on all 32 attention layers of the full SD1.5 UNet);
    # std 0.02 keeps the LoRA's change small enough for finite images
    "ip-adapter-faceid_sd15.bin": ("ip-adapter-faceid_sd15", "random"),
    "ip-adapter-faceid-plusv2_sd15.bin": ("ip-adapter-faceid-plusv2_sd15", "random"),
}
# The insightface pack FaceID uses, as small ONNX models that find the six faces of insightface's
# t1.jpg (tests/face_models.py); written as <identity-models>/buffalo_l, a folder the packs are searched in.
LIVE_FACE_PACK = "buffalo_l"


def write_live_models(folder: Path):
    """Write ``LIVE_MODELS`` below ``folder`` (given to the WebUI as --identity-models-dir)."""
    import torch

    from checkpoints import manifest_keys, write_layout, write_random

    for name, (manifest_name, kind) in LIVE_MODELS.items():
        path = folder / name
        if kind == "random":
            write_random(manifest_keys(manifest_name), path, dtype=torch.float16, std=0.02, seed=len(name))
        else:
            write_layout(manifest_keys(manifest_name), path)
    write_live_face_pack(folder / LIVE_FACE_PACK)


def write_live_face_pack(folder: Path):
    """The test pack for insightface's t1.jpg (six faces) in ``folder``; needs the ``onnx`` package."""
    import face_models as fm

    fm.write_pack(str(folder), fm.T1_FACES, max(fm.T1_SIZE))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebUIError(RuntimeError):
    """The live WebUI did not start, died, or answered an API call with an error."""


class WebUIServer:
    """One WebUI process: start(), then get/post/txt2img against base_url, then stop()."""

    def __init__(self, root, python=None, models_dir=None, extra_args=(), checkpoint=None,
                 hf_home=None, extra_extensions=(), startup_timeout=600.0, request_timeout=600.0,
                 live_models=True):
        self.root = Path(root).resolve()
        self.python = str(python or self.root / "venv" / "bin" / "python")
        self.models_dir = Path(models_dir).resolve() if models_dir else self.root / "models"
        self.extra_args = list(extra_args)
        self.checkpoint = checkpoint
        self.hf_home = hf_home
        self.extra_extensions = [Path(p).resolve() for p in extra_extensions]
        self.startup_timeout = startup_timeout
        self.request_timeout = request_timeout
        self.port = None
        self.base_url = None
        self.process = None
        self._tmp = None
        self.log_path = None
        self.identity_models = None
        self.auth = None  # (user, password): started with --api-auth, requests send them
        self.live_models = live_models  # False: an empty --identity-models-dir (the test writes its own files)

    @classmethod
    def from_env(cls) -> "WebUIServer":
        """A server configured by the SD_WEBUI_* variables (see the module docstring)."""
        env = os.environ
        extra = [p for p in env.get("SD_WEBUI_EXTRA_EXTENSIONS", "").split(os.pathsep) if p]
        return cls(
            root=env["SD_WEBUI_ROOT"],
            python=env.get("SD_WEBUI_PYTHON") or None,
            models_dir=env.get("SD_WEBUI_MODELS_DIR") or None,
            extra_args=shlex.split(env.get("SD_WEBUI_ARGS", "")),
            checkpoint=env.get("SD_WEBUI_CHECKPOINT") or None,
            hf_home=env.get("SD_WEBUI_HF_HOME") or None,
            extra_extensions=extra,
            startup_timeout=float(env.get("SD_WEBUI_STARTUP_TIMEOUT", "600")),
            request_timeout=float(env.get("SD_WEBUI_REQUEST_TIMEOUT", "600")),
        )

    # -- lifecycle -------------------------------------------------------------------------

    def _check_config(self):
        if not (self.root / "launch.py").is_file():
            raise WebUIError(f"SD_WEBUI_ROOT={self.root} has no launch.py; point it at a stable-diffusion-webui checkout")
        if not Path(self.python).is_file():
            raise WebUIError(f"the WebUI's python {self.python} does not exist; set SD_WEBUI_PYTHON to the python of its venv")
        if not (self.models_dir / "Stable-diffusion").is_dir():
            raise WebUIError(
                f"{self.models_dir} has no Stable-diffusion/ folder; set SD_WEBUI_MODELS_DIR to a models folder with a checkpoint in it"
            )

    def _prepare_data_dir(self) -> Path:
        """A throw-away --data-dir: this checkout (and any extra extensions) linked into extensions/."""
        self._tmp = tempfile.TemporaryDirectory(prefix="identity-webui-")
        data = Path(self._tmp.name)
        ext = data / "extensions"
        ext.mkdir()
        (ext / EXTENSION_DIR_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
        for path in self.extra_extensions:
            (ext / path.name).symlink_to(path, target_is_directory=True)
        # Live previews must not fetch a preview decoder from the internet.
        settings = {"show_progress_type": "Approx cheap"}
        if self.checkpoint:
            settings["sd_model_checkpoint"] = self.checkpoint
        (data / "config.json").write_text(json.dumps(settings))
        if self.live_models:
            write_live_models(data / "identity-models")
        else:
            (data / "identity-models").mkdir()
        self.identity_models = data / "identity-models"
        return data

    def start(self) -> "WebUIServer":
        """Launch the WebUI and wait until its API answers; raises WebUIError with the log tail if it does not."""
        self._check_config()
        data = self._prepare_data_dir()
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        args = [self.python, "launch.py", *BASE_ARGS, "--port", str(self.port),
                "--data-dir", str(data), "--models-dir", str(self.models_dir),
                "--identity-models-dir", str(self.identity_models), *self.extra_args]
        if self.auth:
            args += ["--api-auth", ":".join(self.auth)]
        env = dict(os.environ)
        env["GRADIO_ANALYTICS_ENABLED"] = "False"
        env.pop("COMMANDLINE_ARGS", None)  # launch.py would append it to our arguments
        if self.hf_home:
            env.update(HF_HOME=str(self.hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.log_path = data / "webui.log"
        log = open(self.log_path, "wb")
        try:
            # own session: stop() can end the WebUI and anything it started, and nothing else
            self.process = subprocess.Popen(args, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        self._wait_for_api()
        return self

    def _wait_for_api(self):
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise WebUIError(f"the WebUI exited with code {self.process.returncode} while starting\n{self.log_tail()}")
            try:
                self.get("/sdapi/v1/sd-models", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, socket.timeout, WebUIError):
                time.sleep(1)
        self.stop()
        raise WebUIError(f"the WebUI API did not answer within {self.startup_timeout:.0f}s\n{self.log_tail()}")

    def stop(self):
        """End the WebUI process group (SIGTERM, then SIGKILL after 30 s) and remove the data dir."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            except ProcessLookupError:
                pass
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The end of the WebUI's console output (for failure messages)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, AttributeError):
            return "(no WebUI log)"
        return "--- WebUI log (tail) ---\n" + text[-chars:]

    # -- API -------------------------------------------------------------------------------

    def _request(self, method, path, payload=None, timeout=None):
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.auth:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(self.auth).encode()).decode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.request_timeout) as res:
                return json.loads(res.read() or b"null")
        except urllib.error.HTTPError as err:
            body = err.read().decode(errors="replace")
            raise WebUIError(f"{method} {path} answered HTTP {err.code}: {body[:2000]}") from None

    def get(self, path, timeout=None):
        """GET an API path (e.g. "/sdapi/v1/scripts") and return the decoded JSON."""
        return self._request("GET", path, timeout=timeout)

    def post(self, path, payload, timeout=None):
        """POST JSON to an API path and return the decoded JSON."""
        return self._request("POST", path, payload, timeout=timeout)

    def delete(self, path, timeout=None):
        """DELETE an API path (spaces and other characters of names are quoted here)."""
        return self._request("DELETE", urllib.parse.quote(path), timeout=timeout)

    def txt2img(self, payload: dict) -> dict:
        """POST /sdapi/v1/txt2img; the response dict has "images" (base64 PNG), "parameters" and "info"."""
        try:
            return self.post("/sdapi/v1/txt2img", payload)
        except WebUIError as err:
            raise WebUIError(f"{err}\n{self.log_tail()}") from None


_SERVER = None
_START_ERROR = None


@pytest.fixture(scope="session")
def webui(request):
    """The running WebUI (a WebUIServer), started once per test session; skips when SD_WEBUI_ROOT is unset."""
    global _SERVER, _START_ERROR
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    if _START_ERROR is not None:  # do not wait for a failed start again for every test
        pytest.fail(_START_ERROR, pytrace=False)
    # one process even when several test modules import this fixture
    if _SERVER is None:
        server = WebUIServer.from_env()
        try:
            server.start()
        except WebUIError as err:
            _START_ERROR = str(err)
            pytest.fail(_START_ERROR, pytrace=False)
        _SERVER = server
        request.addfinalizer(_stop_shared)
    return _SERVER


def _stop_shared():
    global _SERVER
    if _SERVER is not None:
        _SERVER.stop()
        _SERVER = None
