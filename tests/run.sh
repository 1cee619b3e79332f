#!/usr/bin/env bash
# Sets up the test environment (once) and runs the whole test suite: `bash tests/run.sh`.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k formats -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${IDENTITY_TEST_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.requirements-test.sha"
want=$(cat requirements-test.txt tests/run.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements-test.txt
  # The ldm UNet classes the WebUI runs; --no-deps keeps its old pins out of the venv.
  "$VENV/bin/python" -m pip install -q --no-deps stable-diffusion-sdkit==2.1.5
  # insightface's metadata asks for the GUI opencv and onnx's for protobuf>=4.25.1; neither is needed
  "$VENV/bin/python" -m pip install -q --no-deps insightface==2.1 onnx==1.18.0
  echo "$want" > "$stamp"
fi
exec "$VENV/bin/python" -m pytest -q "$@"
