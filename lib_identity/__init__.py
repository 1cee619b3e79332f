"""sd-webui-identity: IP-Adapter, FaceID, InstantID and PhotoMaker for the AUTOMATIC1111 WebUI.

Nothing here imports the WebUI (``modules``), ``ldm``/``sgm`` or gradio at import time; only
``lib_identity.webui`` does, so the rest runs and is tested from a plain Python.
"""

__version__ = "0.1.0"
