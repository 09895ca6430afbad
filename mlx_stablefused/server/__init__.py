"""``mlx-stablefused serve``: AUTOMATIC1111- and OpenAI-compatible HTTP APIs over one loaded model.

FastAPI + uvicorn (the optional ``server`` extra): A1111's own API is FastAPI, so its request models and
error shapes map one to one; uvicorn is the reference ASGI server. Generation runs on one worker thread
behind a FIFO queue; the HTTP side stays responsive (progress, interrupt) while it runs.
"""

from __future__ import annotations

import logging
import sys

from .settings import Limits, ServerSettings

__all__ = ["Limits", "ServerSettings", "create_app", "serve"]


def create_app(settings: ServerSettings, engine: "object | None" = None) -> object:
    """The ASGI app; loads ``settings.model`` unless a loaded ``Engine`` is given."""
    from .app import create_app as build
    from .engine import Engine

    if engine is None:
        engine = Engine(settings)
        engine.call(lambda e: e.load(settings.model))
    return build(settings, engine)


def serve(settings: ServerSettings) -> int:
    """Load the model, then serve until Ctrl-C. Binds loopback unless told otherwise."""
    import uvicorn

    if not settings.loopback and settings.api_key is None:
        print(f"[mlx-stablefused] warning: serving on {settings.host} without an API key: anyone who can reach "
              "this address can generate (pass --api-key KEY)", file=sys.stderr)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("mlx_stablefused.server")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    from .engine import Engine

    engine = Engine(settings)
    try:
        engine.call(lambda e: e.load(settings.model))
        print(f"[mlx-stablefused] serving {settings.model} on http://{settings.host}:{settings.port} "
              "(the web UI at /, AUTOMATIC1111 API at /sdapi/v1, OpenAI Images API at /v1)", file=sys.stderr)
        uvicorn.run(create_app(settings, engine), host=settings.host, port=settings.port, access_log=False,
                    log_level="warning")
    finally:
        engine.close()
    return 0
