"""HTTP routes for identity profiles: ``GET``/``POST /identity/v1/profiles`` and
``DELETE /identity/v1/profiles/{name}``.

Registered by ``api.register`` with the same ``--api-auth`` dependency as the other routes. Every
file operation is under the WebUI's queue lock and inside ``folders.profile_folder()``: a name is
checked by ``profiles.check_name`` before any path is made from it. Pictures come as base64 or data
URLs and are decoded as images only; nothing sent is unpickled and no path is read.
"""

from __future__ import annotations

from ..errors import IdentityError

BUILD_FIELDS = ("name", "images", "face", "preparation", "crop_position", "overwrite")
_BODY = ('expected a JSON object {"name": "<profile name>", "images": ["<base64 PNG/JPEG/WebP>", ...], '
         '"face": "largest", "overwrite": false}')


def _http(status: int, detail: str):
    from fastapi import HTTPException

    return HTTPException(status_code=status, detail=detail)


def _status_of(error: IdentityError) -> int:
    """404 for no such profile, 409 for a name that is taken, 422 for everything else the client can fix."""
    from .. import profiles

    if isinstance(error, profiles.ProfileNotFoundError):
        return 404
    if isinstance(error, profiles.ProfileExistsError):
        return 409
    return 422


def list_profiles():
    """Every saved profile: ``{"folder": "models/identity/profiles", "profiles": [summary, ...]}``
    (an unreadable file is listed as ``{"name", "error"}``)."""
    from modules.call_queue import queue_lock

    from .. import profiles
    from . import folders

    folder = folders.profile_folder()
    with queue_lock:
        found = profiles.list_profiles(folder)
    return {"folder": folders.shown(folder), "profiles": found}


def _option(request: dict, field: str, default):
    """An optional field through the unit field's own parser, so it accepts what a unit accepts."""
    from .. import units as U
    from ..units.parsers import API, Context, Invalid

    value = request.get(field)
    if value is None:
        return default
    try:
        return U.SPECS[field].parse(value, Context(API))
    except Invalid as e:
        raise _http(422, f"{field}: {e.message}")


def parse_build_request(request) -> dict:
    """The checked arguments of ``profile_build.build_and_save`` from a ``POST`` body, or an
    ``HTTPException`` naming the field (and the picture, counted from 1) that is wrong."""
    from .. import profiles
    from ..image_input import ImageInputError, decode_image_string

    if not isinstance(request, dict):
        raise _http(422, _BODY)
    unknown = sorted(set(request) - set(BUILD_FIELDS))
    if unknown:
        raise _http(422, f"unknown field(s) {', '.join(map(repr, unknown))}; the fields are: {', '.join(BUILD_FIELDS)}")
    name = request.get("name")
    if not isinstance(name, str):
        raise _http(422, 'name: expected the profile\'s name as a string, like "alice"')
    try:
        name = profiles.check_name(name)
    except IdentityError as e:
        raise _http(422, f"name: {e}")
    images = request.get("images")
    if not isinstance(images, list) or not images:
        raise _http(422, f"images: expected a list of 1 to {profiles.MAX_PICTURES} pictures (base64 strings or data URLs)")
    if len(images) > profiles.MAX_PICTURES:
        raise _http(413, f"images: {len(images)} pictures; a profile is built from at most {profiles.MAX_PICTURES}")
    overwrite = request.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise _http(422, "overwrite: expected true or false")
    args = {"name": name, "overwrite": overwrite, "face": _option(request, "face", "largest"),
            "preparation": _option(request, "preparation", "crop"),
            "crop_position": _option(request, "crop_position", "center")}
    pictures = []
    for number, text in enumerate(images, 1):
        try:
            pictures.append(decode_image_string(text))
        except ImageInputError as e:
            raise _http(422, f"images, picture {number}: {e}")
    args["images"] = pictures
    return args


def build_profile(request):
    """Build and save a profile: ``{"profile": summary, "messages": [...]}``; the messages say which
    pictures were left out and why, and what the profile holds."""
    from . import profile_build

    args = parse_build_request(request)
    try:
        result, _path = profile_build.build_and_save(args.pop("name"), args.pop("images"), **args)
    except IdentityError as e:
        raise _http(_status_of(e), str(e))
    return {"profile": result.profile.summary(), "messages": list(result.messages)}


def delete_profile(name: str):
    """Delete one profile: ``{"deleted": name}``; 404 when there is none of that name, 422 for a name
    that is not one (a path, ``..``)."""
    from modules.call_queue import queue_lock

    from .. import profiles
    from . import folders

    try:
        name = profiles.check_name(name)
        with queue_lock:
            profiles.delete_profile(folders.profile_folder(), name)
    except IdentityError as e:
        raise _http(_status_of(e), str(e))
    return {"deleted": name}


def register(app, deps) -> None:
    """Add the three routes to ``app`` behind ``deps`` (the ``--api-auth`` check of ``api.register``)."""
    from fastapi import Body

    def build_route(request: dict = Body(...)):
        return build_profile(request)

    def delete_route(name: str):
        return delete_profile(name)

    app.add_api_route("/identity/v1/profiles", list_profiles, methods=["GET"], dependencies=deps)
    app.add_api_route("/identity/v1/profiles", build_route, methods=["POST"], dependencies=deps)
    # ``:path`` so that a name holding "/" (or an encoded %2F) reaches the name check and is
    # answered 422 with the rule, instead of falling through to another route
    app.add_api_route("/identity/v1/profiles/{name:path}", delete_route, methods=["DELETE"], dependencies=deps)
