"""The extension's AlwaysOn script, as a mixin combined with `modules.scripts.Script` in scripts/identity.py.

Placeholder: it registers the accordion's name with the WebUI and does nothing else yet, so that
the WebUI can load the extension (and the live WebUI tests can check that it did).
"""
import modules.scripts as scripts


class IdentityScript:
    """Behaviour of the "Identity" AlwaysOn script; scripts/identity.py adds `scripts.Script`."""

    def title(self):
        """The name the WebUI shows, and the key of `alwayson_scripts` in API requests ("identity")."""
        return "Identity"

    def show(self, is_img2img):
        """Shown on both tabs, always on: the units decide whether anything happens."""
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        """No controls yet."""
        return []
