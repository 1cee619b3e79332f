"""Run this checkout's install.py in the live WebUI's venv, the way the WebUI runs extension installers.

``modules/launch_utils.py`` ``run_extension_installer`` (WebUI 1.10.1) runs ``"<python>" "<ext>/install.py"``
as a child of the WebUI's python, with the WebUI root prepended to PYTHONPATH and the WebUI's own
working directory (its root). This really installs into that venv, from the package index pip is
configured with: that is the point (insightface and onnxruntime are what FaceID needs there).

``installer_runs`` (session fixture) records ``pip freeze`` before, the first run, ``pip freeze``
after it, and a second run, once per test session; the install test reads the record and the
live FaceID tests request it so the face packages are there before they run.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import pytest

from webui_live import REPO_ROOT, skip_reason

INSTALL_TIMEOUT = 1800  # a first install downloads onnxruntime and insightface


def webui_root() -> Path:
    return Path(os.environ["SD_WEBUI_ROOT"]).resolve()


def webui_python() -> str:
    return os.environ.get("SD_WEBUI_PYTHON") or str(webui_root() / "venv" / "bin" / "python")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_freeze(python: str) -> Dict[str, str]:
    """Every distribution of that python (pip, setuptools too): normalised name -> the freeze line's version part."""
    out = subprocess.run([python, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True,
                         timeout=300).stdout
    found = {}
    for line in out.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for sep in ("==", " @ "):
            if sep in line:
                name, version = line.split(sep, 1)
                found[_normalize(name)] = version.strip()
                break
        else:
            found[line] = ""  # an editable or otherwise unusual line: compared as a whole
    return found


def run_installer(root: Path, python: str) -> subprocess.CompletedProcess:
    """install.py as ``run_extension_installer`` runs it: WebUI root on PYTHONPATH, cwd = WebUI root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}"
    # launch_utils appends COMMANDLINE_ARGS to its arguments; a --skip-install there would make this a no-op
    env.pop("COMMANDLINE_ARGS", None)
    # webui.sh runs everything with its venv activated
    venv_bin = str(Path(python).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = str(Path(venv_bin).parent)
    return subprocess.run([python, str(REPO_ROOT / "install.py")], cwd=str(root), env=env, capture_output=True,
                          text=True, timeout=INSTALL_TIMEOUT)


def imports_ok(python: str, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in the WebUI's python (cwd: its root, as the WebUI runs)."""
    return subprocess.run([python, "-c", code], cwd=str(webui_root()), capture_output=True, text=True, timeout=600)


@dataclass
class InstallerRuns:
    before: Dict[str, str]
    first: subprocess.CompletedProcess
    after_first: Dict[str, str]
    second: subprocess.CompletedProcess
    after_second: Dict[str, str]


_RUNS = None


@pytest.fixture(scope="session")
def installer_runs() -> InstallerRuns:
    """install.py run twice in the WebUI's venv, with ``pip freeze`` around each run (once per session)."""
    global _RUNS
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    if _RUNS is None:
        root, python = webui_root(), webui_python()
        before = pip_freeze(python)
        first = run_installer(root, python)
        after_first = pip_freeze(python)
        second = run_installer(root, python)
        _RUNS = InstallerRuns(before, first, after_first, second, pip_freeze(python))
    return _RUNS


def describe(run: subprocess.CompletedProcess) -> str:
    return f"exit code {run.returncode}\n--- stdout ---\n{run.stdout[-4000:]}\n--- stderr ---\n{run.stderr[-4000:]}"
