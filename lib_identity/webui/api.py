"""HTTP routes: /identity/v1/version, /identity/v1/models, /identity/v1/inspect.

Registered from ``on_app_started``. FastAPI routes added that way are not covered by the WebUI's
``--api-auth`` on their own, so the same HTTP Basic check is attached here.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the auth dependency's parameter
# annotation, and the class it names is imported inside a function, not at module level.

from secrets import compare_digest

from .. import __version__
from ..errors import IdentityError, ModelNotFoundError


def _credentials():
    from modules import shared

    creds = {}
    for pair in (shared.cmd_opts.api_auth or "").split(","):
        if ":" in pair:
            user, password = pair.split(":", 1)
            creds[user] = password
    return creds


def _dependencies():
    from modules import shared

    if not getattr(shared.cmd_opts, "api_auth", None):
        return []
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    creds = _credentials()

    def auth(credentials: HTTPBasicCredentials = Depends(HTTPBasic())):
        stored = creds.get(credentials.username)
        if stored is not None and compare_digest(credentials.password, stored):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    return [Depends(auth)]


def version():
    return {"version": __version__, "api": 1}


def models(refresh: bool = False):
    """Every discovered file with its detected variant, or why it is unusable."""
    from modules.call_queue import queue_lock

    from . import folders

    with queue_lock:
        entries = folders.list_models(refresh=refresh)
    return {"folders": folders.model_folders(), "models": [e.to_json() for e in entries]}


def inspect(request: dict):
    """One named model in full. Body: ``{"model": "<name as /identity/v1/models lists it>"}``."""
    from fastapi import HTTPException
    from modules.call_queue import queue_lock

    from . import folders

    if not isinstance(request, dict) or not isinstance(request.get("model"), str):
        raise HTTPException(status_code=422, detail='expected a JSON object {"model": "<model name>"}')
    with queue_lock:
        try:
            entry = folders.find_model(request["model"])
        except ModelNotFoundError as e:
            raise HTTPException(status_code=404, detail=str(e))
        except IdentityError as e:
            raise HTTPException(status_code=422, detail=str(e))
    return entry.to_json()


def register(_demo, app):
    """``on_app_started`` callback."""
    from fastapi import Body

    deps = _dependencies()

    def inspect_route(request: dict = Body(...)):
        return inspect(request)

    app.add_api_route("/identity/v1/version", version, methods=["GET"], dependencies=deps)
    app.add_api_route("/identity/v1/models", models, methods=["GET"], dependencies=deps)
    app.add_api_route("/identity/v1/inspect", inspect_route, methods=["POST"], dependencies=deps)
