# The WebUI executes this file (it is not importable); everything lives in lib_identity.
import modules.scripts as scripts

from lib_identity.webui import script as identity

identity.register_callbacks()


class Script(identity.IdentityScript, scripts.Script):
    """The AlwaysOn "Identity" script; behaviour is in lib_identity.webui."""
