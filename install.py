# Run by the WebUI at every start (as a child process, with the WebUI root on PYTHONPATH).
# Fast and idempotent: installs only packages that are missing, never upgrades what the WebUI pins
# (torch, gradio, transformers, pydantic, numpy), and does nothing when --skip-install is given.
import importlib.util

# (import name, pip requirement) pairs this extension needs beyond the WebUI's own requirements.
# Everything needed for IP-Adapter (safetensors, transformers' CLIP vision model, opencv, Pillow)
# already ships with the WebUI.
REQUIREMENTS = []


def missing(requirements):
    return [req for mod, req in requirements if importlib.util.find_spec(mod) is None]


def main():
    todo = missing(REQUIREMENTS)
    if not todo:
        return
    import launch  # the WebUI's helpers; honours --skip-install and the WebUI's index URL

    for req in todo:
        # --no-deps would be safest for pins but breaks packages with real needs; pip's resolver keeps
        # already-installed versions unless a requirement forces otherwise, and none of ours pin them.
        launch.run_pip(f'install "{req}"', f"sd-webui-identity requirement: {req}")


if __name__ == "__main__":
    main()
