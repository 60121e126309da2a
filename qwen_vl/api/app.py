"""The HTTP API: OpenAI's chat and completions endpoints for Qwen-VL, tokenize, models, health,
version, metrics and the playground. `create_app` assembles it: the shared state
(state.ApiState on app.state.api), one router per group of endpoints (routes/), the middleware
(middleware.py, given the routes once they exist), the error handlers and the OpenAPI document;
`lifespan` starts and stops the engine."""

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles

from qwen_vl.engine.engine import Engine

from .errors import install_error_handlers
from .images import new_client
from .middleware import BodySizeLimit, CountRequests, RequireKey, needs_key
from .routes import chat, completions, playground, service, tokenize
from .settings import ApiSettings
from .state import ApiState

logger = logging.getLogger("qwen_vl.api")
ENGINE_WATCH_INTERVAL = 0.5  # seconds
ENGINE_DEAD_LINGER = 3.0  # seconds


async def watch_engine(api: ApiState) -> None:
    while api.engine.serving:
        await asyncio.sleep(ENGINE_WATCH_INTERVAL)
    logger.error("the engine died: answering 503 for %.0f s, then exiting", ENGINE_DEAD_LINGER)
    # Linger briefly so that load balancers and clients see 503s (and
    # /health fail) rather than refused connections, then exit.
    await asyncio.sleep(ENGINE_DEAD_LINGER)
    if api.on_engine_dead is not None:
        api.on_engine_dead()


@asynccontextmanager
async def lifespan(app: FastAPI):
    api: ApiState = app.state.api
    started = time.perf_counter()
    api.engine.start()
    async with new_client(api.image_limits) as http:
        api.started(http)
        logger.info(
            "serving %s as %r (engine ready in %.1f s, context %d tokens, at most %d images per request)",
            api.settings.model, api.settings.served_model_name, time.perf_counter() - started,
            api.engine.max_model_len, api.max_images,
        )
        watcher = asyncio.create_task(watch_engine(api))
        yield
        watcher.cancel()
    api.engine.stop()


def create_app(settings: ApiSettings, engine: Engine, on_engine_dead: Callable[[], None] | None = None) -> FastAPI:
    """`on_engine_dead` is called once if the engine dies: the process should
    then exit non-zero so that an orchestrator restarts it."""
    app = FastAPI(title="qwen-vl-serve", version=service.VERSION, lifespan=lifespan)
    app.state.api = ApiState(settings, engine, on_engine_dead)
    install_error_handlers(app)
    for router in (chat.router, completions.router, tokenize.router, service.router):
        app.include_router(router)
    if settings.playground:
        app.include_router(playground.router)
        app.mount("/static", StaticFiles(directory=playground.STATIC), name="static")
    # Each one added wraps those before it. From the outside in: the counter (it sees every
    # answer, 401s and CORS preflights too), CORS, the key check (before any body is read),
    # the body limit.
    app.add_middleware(BodySizeLimit, limit=settings.max_request_bytes)
    app.add_middleware(RequireKey, keys=settings.api_keys, protect_metrics=settings.protect_metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(CountRequests, paths=frozenset(getattr(route, "path", None) for route in app.routes))
    app.openapi = lambda: openapi_document(app, settings)
    return app


def openapi_document(app: FastAPI, settings: ApiSettings) -> dict:
    """FastAPI's document, told true: no 422 (this server answers invalid
    bodies with 400 and OpenAI's error object, documented per route), and
    with API keys the bearer scheme on the paths RequireKey guards."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
                if settings.api_keys and needs_key(path, settings.protect_metrics):
                    operation["security"] = [{"apiKey": []}]
                    operation["responses"].setdefault("401", {
                        "description": "missing or invalid API key",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                    })
        if settings.api_keys:
            schema["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = schema
    return app.openapi_schema
