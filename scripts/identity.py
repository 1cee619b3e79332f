# The WebUI executes this file (it is not importable); everything lives in lib_identity.
import modules.scripts as scripts

from lib_identity.webui.script import IdentityScript


class Script(IdentityScript, scripts.Script):
    """The AlwaysOn script; behaviour is in lib_identity.webui.script."""
