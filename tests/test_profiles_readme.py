"""The README's profile example, run as it is written: build, list, txt2img with a profile unit,
delete, with and without --api-auth.

The server is the extension's routes (and its 422 gate) on a FastAPI app with a stand-in WebUI
around the real ldm UNet; ``/sdapi/v1/txt2img`` is a stand-in that runs the Identity units through
the WebUI glue (``runtime.process``, one denoiser step) and answers the infotext. Where uvicorn is
installed (the WebUI-pins lane: gradio brings it), the example talks HTTP to it with the real
``requests``; elsewhere ``requests`` is a stand-in over FastAPI's TestClient.
"""

import contextlib
import json
import os
import re
import socket
import sys
import threading
import types

import pytest

from handoff import denoise, make_env, new_p, picture

fastapi = pytest.importorskip("fastapi")

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_example() -> str:
    text = open(README, encoding="utf-8").read()
    m = re.search(r"<!-- profiles example[^\n]*-->\n```python\n(.*?)```", text, re.S)
    assert m, "README.md has no profiles example"
    return m.group(1)


def make_app(env):
    from fastapi import Body

    from lib_identity.webui import api

    app = fastapi.FastAPI()
    api.register(None, app)

    def txt2img(payload: dict = Body(...)):
        p = new_p(env.model, None)
        env.runtime.process(p, payload["alwayson_scripts"]["identity"]["args"])
        env.runtime.before_sampling(p)
        x, t, c = env.inputs
        denoise(env, x, t, c, n_cond=1)
        env.runtime.end_pass(p)
        params = ", ".join(f'{k}: "{v}"' for k, v in p.extra_generation_params.items())
        return {"images": [], "info": json.dumps({"infotexts": [f"{payload['prompt']}\nSteps: {payload['steps']}, {params}"]})}

    app.add_api_route("/sdapi/v1/txt2img", txt2img, methods=["POST"], dependencies=api._dependencies())
    return app


@contextlib.contextmanager
def serve(app):
    """(URL, requests module): uvicorn on a free loopback port when it is installed, else TestClient."""
    try:
        import uvicorn
    except ImportError:
        uvicorn = None
    if uvicorn is None:
        from fastapi.testclient import TestClient

        client = TestClient(app)
        shim = types.ModuleType("requests")  # what the example's ``import requests`` gets (sys.modules)
        shim.__dict__.update(
            get=lambda url, **kw: client.get(url, **kw), post=lambda url, **kw: client.post(url, **kw),
            delete=lambda url, **kw: client.delete(url, **kw))
        yield "http://testserver", shim
        return
    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(600):  # until it listens (a start that fails leaves the loop and the call below fails)
            if server.started or not thread.is_alive():
                break
            threading.Event().wait(0.05)
        yield f"http://127.0.0.1:{port}", requests
    finally:
        server.should_exit = True
        thread.join()


@pytest.mark.parametrize("api_auth", [None, "user:password"])
def test_the_readmes_profile_example_runs(monkeypatch, tmp_path, capsys, api_auth):
    env = make_env(monkeypatch, tmp_path)
    if api_auth:
        sys.modules["modules.shared"].cmd_opts.api_auth = api_auth
    monkeypatch.chdir(tmp_path)
    for i in (1, 2, 3):
        picture(i, size=(96, 80)).save(tmp_path / f"alice{i}.jpg")
    code = readme_example()
    assert '"model": "ip-adapter-faceid-plusv2_sd15"' in code
    code = code.replace("ip-adapter-faceid-plusv2_sd15", env.adapter)  # the test's adapter file for the published one
    if api_auth:
        code = code.replace("AUTH = None", "AUTH = ('user', 'password')")
    try:
        with serve(make_app(env)) as (url, requests):
            code = code.replace('URL = "http://127.0.0.1:7860"', f"URL = {url!r}")
            monkeypatch.setitem(sys.modules, "requests", requests)
            exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
            if api_auth:  # and without the credentials, nothing
                assert requests.get(f"{url}/identity/v1/profiles").status_code == 401
    finally:
        env.runtime.cleanup()
    lines = capsys.readouterr().out.splitlines()
    assert "profile 'alice': 3 of 3 picture(s); holds CLIP (clip-vit-h image_embeds)" in lines
    assert "alice 3 pictures " in lines
    identity = next(line for line in lines if "Identity 1:" in line)
    assert f"model: {env.adapter} [" in identity and "profile: alice" in identity and "weight: 0.8" in identity
    assert lines[-1] == "{'deleted': 'alice'}"
    assert not (tmp_path / "models" / "identity" / "profiles" / "alice.safetensors").exists()
