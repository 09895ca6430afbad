"""The ASGI app: authentication, a body-size cap, one log line per request, errors as JSON naming the field."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from .. import __version__
from . import a1111, openai_api, ui_api
from .engine import Engine
from .images import FieldError
from .service import ClientGone, Service
from .settings import ServerSettings
from .worker import Cancelled, QueueFull

log = logging.getLogger("mlx_stablefused.server")


# Words in the pipeline's error messages -> the request field they are about (first match).
PIPELINE_NAMES = (("<lora:", "prompt"), ("image_height", "height"), ("image_width", "width"),
                  ("strength", "denoising_strength"), ("num_inference_steps", "steps"), ("prompt", "prompt"))


class BodyTooLarge(Exception):
    pass


class Gate:
    """Pure ASGI, around everything: request id, the API key (401), the body cap (413), the log line."""

    def __init__(self, app: Any, settings: ServerSettings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:8]
        scope.setdefault("state", {})["request_id"] = rid
        start, status = time.perf_counter(), [0]

        async def send_logged(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_logged)
        finally:
            size = scope["state"].get("size", "-")
            log.info("%s %s %s %d %.2fs %s", rid, scope["method"], scope["path"], status[0],
                     time.perf_counter() - start, size)

    async def _handle(self, scope: dict, receive: Any, send: Any) -> None:
        key = self.settings.api_key
        if key is not None:
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not _authorized(given, key):
                # The web UI's page asks the browser for the key (HTTP Basic: any user name, the key as password).
                challenge = b'Basic realm="mlx-stablefused"' if _is_page(scope["path"]) else b"Bearer"
                return await _send_json(send, 401, _error(scope["path"], "authorization",
                                                          "missing or wrong API key: send 'Authorization: Bearer KEY'"),
                                        [(b"www-authenticate", challenge)])
        cap = self.settings.limits.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            await _drain(receive, 4 * cap)  # read it, so the client sees the answer rather than a reset
            return await _send_json(send, 413, _too_large(scope["path"], int(length), cap))
        seen, started = [0], [False]

        async def capped_receive() -> dict:
            message = await receive()
            seen[0] += len(message.get("body", b""))
            if seen[0] > cap:
                raise BodyTooLarge()
            return message

        async def tracked_send(message: dict) -> None:
            started[0] = True
            await send(message)

        try:
            await self.app(scope, capped_receive, tracked_send)
        except BodyTooLarge:
            if not started[0]:
                await _drain(receive, 4 * cap)
                await _send_json(send, 413, _too_large(scope["path"], seen[0], cap))


def _is_page(path: str) -> bool:
    return path == "/" or path.startswith("/ui/static/")


def _authorized(header: str, key: str) -> bool:
    """``Bearer KEY`` (OpenAI's clients), or HTTP Basic with KEY as the password (A1111's --api-auth, which
    webuiapi's username/password send)."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode("utf-8", "surrogateescape"), key.encode("utf-8"))


async def _drain(receive: Any, limit: int) -> None:
    total = 0
    while total <= limit:
        message = await receive()
        total += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            return


def _too_large(path: str, size: int, cap: int) -> dict:
    return _error(path, "body", f"request body of {size} bytes is over this server's limit of {cap} bytes")


def _error(path: str, field: str, message: str) -> dict:
    """OpenAI's error shape under /v1; FastAPI's (which A1111 clients see from A1111) elsewhere."""
    if path.startswith("/v1/"):
        return {"error": {"message": f"{field}: {message}", "type": "invalid_request_error", "param": field,
                          "code": None}}
    return {"detail": [{"loc": ["body", field], "msg": message, "type": "value_error"}],
            "error": f"{field}: {message}"}


async def _send_json(send: Any, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


def _field_of(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def create_app(settings: ServerSettings, engine: Engine) -> Any:
    """The ASGI app around a loaded ``engine`` (which several apps may share: one queue, one thread)."""
    service = Service(settings, engine)
    app = FastAPI(title="mlx-stablefused", version=__version__)
    app.state.service = service
    app.include_router(a1111.router(service))
    app.include_router(openai_api.router(service))
    app.include_router(ui_api.router(service))

    def reply(request: Request, status: int, field: str, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(_error(request.url.path, field, message), status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValidationError)
    async def invalid(request: Request, exc: Any) -> JSONResponse:
        first = exc.errors()[0]
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        return reply(request, 422, _field_of(tuple(first.get("loc", ()))), message)

    @app.exception_handler(FieldError)
    async def field_error(request: Request, exc: FieldError) -> JSONResponse:
        return reply(request, exc.status, exc.field, exc.message)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return reply(request, 503, "queue", str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(ClientGone)
    @app.exception_handler(Cancelled)
    async def gone(request: Request, exc: Exception) -> JSONResponse:
        return reply(request, 499, "client", "the client disconnected")

    @app.exception_handler(ValueError)
    @app.exception_handler(MemoryError)
    async def refused(request: Request, exc: Exception) -> JSONResponse:
        # The pipeline's own checks (a <lora:...> tag without a file, a request that cannot fit): that
        # request alone fails, named by the request field the pipeline's message is about.
        text = str(exc)
        field = next((name for key, name in PIPELINE_NAMES if key in text), "request")
        return reply(request, 422, field, text)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return reply(request, 500, "generation", f"failed: {type(exc).__name__}: {exc}")

    return Gate(app, settings)
