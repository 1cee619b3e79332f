# Run by the WebUI at every start (as a child process, with the WebUI root on PYTHONPATH).
# Fast and idempotent: installs only what is missing, never upgrades what the WebUI pins
# (torch, gradio, transformers, pydantic, numpy, protobuf, opencv), and does nothing when
# --skip-install is given. IP-Adapter needs nothing beyond the WebUI's own requirements; face
# analysis (FaceID, InstantID, PhotoMaker V2) needs insightface and onnxruntime. What to install
# is decided by lib_identity/install_plan.py (tested without a network).
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lib_identity.install_plan import installed_distributions, plan, torch_sees_cuda  # noqa: E402


def main():
    commands = plan(installed_distributions(), torch_sees_cuda)
    if not commands:
        return
    import launch  # the WebUI's helpers; honours --skip-install and the WebUI's index URL

    for args in commands:
        what = next(a for a in args[1:] if not a.startswith("-"))
        launch.run_pip(" ".join(shlex.quote(a) for a in args), f"sd-webui-identity requirement: {what}")


if __name__ == "__main__":
    main()
