"""HTTP routes: /identity/v1/version, /identity/v1/models, /identity/v1/inspect, /identity/v1/faces,
/identity/v1/profiles (``profile_api``), and the gate that answers bad Identity units in txt2img/img2img with 422 (``api_gate``).

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


def faces(request: dict):
    """The faces insightface finds in a picture, and the picture with numbered boxes.

    Body: ``{"image": "<base64 or data:image/...;base64,...>", "pack": "buffalo_l", "det_size": 640,
    "preview": true}``; ``pack`` is a pack *name*, looked for in the configured folders only.
    Answer: ``{"pack", "det_size", "size": [w, h], "faces": [{"index", "box", "score", "keypoints"}],
    "preview": "data:image/png;base64,..."}``, faces largest first (the index a unit's ``face`` takes).
    """
    from fastapi import HTTPException
    from modules.call_queue import queue_lock

    from ..encoders import faces as face_analysis
    from ..image_input import ImageInputError, decode_image_string, encode_png_data_url
    from . import folders

    if not isinstance(request, dict) or "image" not in request:
        raise HTTPException(status_code=422, detail='expected a JSON object {"image": "<base64 PNG/JPEG/WebP>", "pack": "buffalo_l"}')
    pack = request.get("pack") or face_analysis.DEFAULT_PACK
    det_size = request.get("det_size", face_analysis.DEFAULT_DET_SIZE)
    if not isinstance(pack, str) or isinstance(det_size, bool) or not isinstance(det_size, int):
        raise HTTPException(status_code=422, detail='"pack" must be a pack name (like "buffalo_l") and "det_size" an integer (like 640)')
    try:
        picture = decode_image_string(request["image"])
    except ImageInputError as e:
        raise HTTPException(status_code=422, detail=f"image: {e}")
    with queue_lock:
        try:
            found = face_analysis.analyse_faces(picture, folders.find_face_pack(pack), det_size=det_size)
        except ModelNotFoundError as e:
            raise HTTPException(status_code=404, detail=str(e))
        except IdentityError as e:
            raise HTTPException(status_code=422, detail=str(e))
    answer = {"pack": pack, "det_size": det_size, "size": [picture.width, picture.height],
              "faces": [dict(index=i, **f.to_json()) for i, f in enumerate(found)]}
    if request.get("preview", True):
        answer["preview"] = encode_png_data_url(face_analysis.draw_faces(picture, found))
    return answer


def check_api_units(args: list, checkpoint_overridden: bool = False) -> None:
    """Raise the ``IdentityError`` a txt2img/img2img request's Identity units would stop the run with.

    The same parsing and checks as the run (``runtime.process``), short of what needs the
    generation itself. When the request switches the checkpoint (``override_settings``), the
    loaded one's base says nothing about the run, so the base check is left to the run.
    """
    from .. import units as U
    from . import lookup, settings

    units = U.parse_script_args(args, unit_count=settings.unit_count())
    if any(u.enabled for u in units):
        lookup.resolve_units(units, None if checkpoint_overridden else lookup.loaded_base())


def register(_demo, app):
    """``on_app_started`` callback: the routes, and the 422 gate on txt2img/img2img."""
    from fastapi import Body

    from . import api_gate, profile_api

    deps = _dependencies()
    api_gate.install(app, check_api_units, credentials=_credentials)

    def inspect_route(request: dict = Body(...)):
        return inspect(request)

    def faces_route(request: dict = Body(...)):
        return faces(request)

    app.add_api_route("/identity/v1/version", version, methods=["GET"], dependencies=deps)
    app.add_api_route("/identity/v1/models", models, methods=["GET"], dependencies=deps)
    app.add_api_route("/identity/v1/inspect", inspect_route, methods=["POST"], dependencies=deps)
    app.add_api_route("/identity/v1/faces", faces_route, methods=["POST"], dependencies=deps)
    profile_api.register(app, deps)
