"""Bad Identity units in ``/sdapi/v1/txt2img`` and ``img2img`` are answered with HTTP 422 before
the WebUI's handler runs.

Without this, a malformed unit is found only inside the generation, after the WebUI has taken
the queue lock and set the run up, and the request fails with 500, which clients read as "the
server broke, retry". The gate is a plain ASGI middleware: it reads the body once, checks the
``identity`` units with the same parser and checks as every other entry point
(``lookup.resolve_units``), and either answers 422 or hands exactly the bytes it read on to the
WebUI. Requests without Identity units, other paths and other methods are not touched at all.

With ``--api-auth``, a request whose credentials do not match goes on untouched, so the WebUI
answers it with 401 before anyone learns anything about the model folders.
"""

from __future__ import annotations

import base64
import json
import logging
from secrets import compare_digest
from typing import Callable, Dict, List, Optional

from ..errors import IdentityError, UnitError
from . import TITLE

log = logging.getLogger("sd-webui-identity")

GATED_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")
ERROR_TYPE = "value_error.identity"


def find_identity_args(request) -> Optional[list]:
    """The ``args`` of the Identity entry of ``alwayson_scripts`` (matched as the WebUI matches
    script titles, ignoring case), or None when the request has none."""
    if not isinstance(request, dict):
        return None
    scripts = request.get("alwayson_scripts")
    if not isinstance(scripts, dict):
        return None
    for name, value in scripts.items():
        if isinstance(name, str) and name.lower() == TITLE.lower():
            return value.get("args") if isinstance(value, dict) else None
    return None


def _first_unit_position(args: list) -> int:
    """Where unit 1 sits in ``args``: after a leading accordion flag, if the request sends one."""
    return 1 if args and not isinstance(args[0], dict) and len(args) > 1 and isinstance(args[1], dict) else 0


def problem_detail(error: IdentityError, args) -> List[dict]:
    """FastAPI's validation-error shape for one unit error: where it is in the body, and the message."""
    loc: list = ["body", "alwayson_scripts", TITLE.lower(), "args"]
    if isinstance(error, UnitError) and error.unit is not None:
        loc.append(error.unit - 1 + _first_unit_position(args if isinstance(args, list) else []))
        if error.field:
            loc.append(error.field)
    return [{"loc": loc, "msg": str(error), "type": ERROR_TYPE}]


def check_body(body: bytes, check_units: Callable[[list, bool], None]) -> Optional[List[dict]]:
    """The 422 detail for a txt2img/img2img body whose Identity units are bad, else None.

    ``check_units(args, checkpoint_overridden)`` raises ``IdentityError`` for a bad unit. A body
    that is not JSON, or has no Identity units, is the WebUI's business: None.
    """
    try:
        request = json.loads(body)
    except ValueError:
        return None
    args = find_identity_args(request)
    if args is None:
        return None
    overrides = request.get("override_settings")
    overridden = isinstance(overrides, dict) and bool(overrides.get("sd_model_checkpoint"))
    try:
        if not isinstance(args, list):
            raise UnitError(None, None, "'args' must be a list of unit objects: "
                            '{"identity": {"args": [{"model": …, "images": […]}]}}')
        check_units(args, overridden)
    except IdentityError as e:
        return problem_detail(e, args)
    return None


def basic_auth_ok(headers: Dict[bytes, bytes], credentials: Dict[str, str]) -> bool:
    """Whether the request carries one of ``credentials`` (user -> password) as HTTP Basic auth."""
    if not credentials:
        return True
    value = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(token.strip()).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    stored = credentials.get(user)
    return stored is not None and compare_digest(password.encode("utf-8"), stored.encode("utf-8"))


class UnitGate:
    """ASGI middleware: 422 for bad Identity units on the gated paths, everything else passed through."""

    def __init__(self, app, check_units: Callable[[list, bool], None], credentials: Callable[[], Dict[str, str]] = dict):
        self.app = app
        self.check_units = check_units
        self.credentials = credentials

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST" or not _gated(scope):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        if not basic_auth_ok(headers, self.credentials()):
            await self.app(scope, receive, send)  # the WebUI answers 401
            return
        chunks, disconnected = [], False
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        detail = None if disconnected else await self._check(body)
        if detail is not None:
            await _send_json(send, 422, {"detail": detail})
            return
        await self.app(scope, _replay(body, receive, disconnected), send)

    async def _check(self, body: bytes):
        from starlette.concurrency import run_in_threadpool

        try:
            # decoding pictures and reading model headers must not hold up the event loop
            return await run_in_threadpool(check_body, body, self.check_units)
        except Exception:  # noqa: BLE001 - a fault in the gate must never cost the user the request
            log.exception("[identity] could not check the request's Identity units; the WebUI will check them")
            return None


def _gated(scope) -> bool:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.rstrip("/") in GATED_PATHS


def _replay(body: bytes, receive, disconnected: bool):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            if disconnected:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_json(send, status: int, payload) -> None:
    data = json.dumps(payload).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def install(app, check_units: Callable[[list, bool], None], credentials: Callable[[], Dict[str, str]] = dict) -> None:
    """Add the gate to a FastAPI/Starlette app that may already be serving (``on_app_started``).

    It goes last among the app's own middleware, so CORS and gzip apply to its answers too. The
    stack is rebuilt on the next request, as the WebUI does when it adds its own middleware.
    """
    from starlette.middleware import Middleware

    if any(getattr(m, "cls", None) is UnitGate for m in app.user_middleware):
        app.user_middleware[:] = [m for m in app.user_middleware if getattr(m, "cls", None) is not UnitGate]
    app.user_middleware.append(Middleware(UnitGate, check_units=check_units, credentials=credentials))
    app.middleware_stack = None
