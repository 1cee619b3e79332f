#!/usr/bin/env bash
# Sets up the test environment (once) and runs the whole test suite: `bash tests/run.sh`.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k formats -x`.
#
# `bash tests/run.sh --webui-pins` (or IDENTITY_WEBUI_PINS=1) runs the same suite in a second
# venv on the WebUI's own pins (Python 3.10, torch 2.1.2, transformers 4.30.2, gradio 3.41.2,
# pydantic v1: requirements-webui-pins.txt), where users run the extension. Venv paths:
# IDENTITY_TEST_VENV (default .venv) and IDENTITY_PINS_VENV (default .venv-pins).
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=${IDENTITY_WEBUI_PINS:-0}
if [ "${1:-}" = "--webui-pins" ]; then
  PINS=1
  shift
fi
if [ "$PINS" = 1 ]; then
  # tests/oracles.py reads it: the test-only oracles (diffusers) are absent here on purpose.
  export IDENTITY_WEBUI_PINS=1
  VENV=${IDENTITY_PINS_VENV:-.venv-pins}
  REQUIREMENTS=requirements-webui-pins.txt
  # Python 3.10 comes through pyenv on the project's machines; PYENV_VERSION is ignored elsewhere.
  PY=${PYTHON_PINS:-python3.10}
  export PYENV_VERSION=${PYENV_VERSION:-3.10.13}
else
  VENV=${IDENTITY_TEST_VENV:-.venv}
  REQUIREMENTS=requirements-test.txt
  PY=${PYTHON:-python3}
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.requirements-test.sha"
want=$(cat "$REQUIREMENTS" tests/run.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r "$REQUIREMENTS"
  # The ldm UNet classes the WebUI runs; --no-deps keeps its old pins out of the venv.
  "$VENV/bin/python" -m pip install -q --no-deps stable-diffusion-sdkit==2.1.5
  # insightface's metadata asks for the GUI opencv and onnx's for protobuf>=4.25.1; neither is needed
  "$VENV/bin/python" -m pip install -q --no-deps insightface==2.1 onnx==1.18.0
  # only for the CLIP BPE vocabulary it ships (the WebUI's version); its torchvision is not needed
  "$VENV/bin/python" -m pip install -q --no-deps open-clip-torch==2.20.0
  echo "$want" > "$stamp"
fi
exec "$VENV/bin/python" -m pytest -q "$@"
