"""The API's ASGI middleware, plain ASGI (Starlette's BaseHTTPMiddleware would relay every
streamed chunk through a queue): the body size limit, the API key check, the request counter."""

import hmac

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from qwen_vl.engine import metrics

from .errors import APIError, error_body


class BodySizeLimit:
    """413 for bodies beyond the limit, by header or by counting what arrives."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"request body larger than {self.limit} bytes", code="request_too_large")
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            response = JSONResponse(error_body(413, too_large.message, code=too_large.code), status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # Raised inside FastAPI's body read; the APIError handler answers it.
                    raise too_large
            return message

        await self.app(scope, counting_receive, send)


def needs_key(path: str, protect_metrics: bool) -> bool:
    """The API's own paths; not /health, /version, the docs, nor /metrics unless protected."""
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize") or (protect_metrics and path == "/metrics")


class RequireKey:
    """401 for requests to protected paths without a valid key, before
    anything reads or parses the body. Plain ASGI, outside the body limit."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], protect_metrics: bool):
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.protect_metrics = protect_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        # CORS preflights never get here: the CORS middleware, outside this one, answers them.
        if scope["type"] != "http" or not self.keys or not needs_key(scope["path"], self.protect_metrics):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers", [])).get(b"authorization", b"")
        token = header[7:].strip() if header[:7].lower() == b"bearer " else b""
        # Compare against every key, always, in constant time.
        if not any([hmac.compare_digest(token, key) for key in self.keys]):
            response = JSONResponse(error_body(401, "missing or invalid API key", code="invalid_api_key"),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class CountRequests:
    """qwen_vl_requests_total by route and status. Plain ASGI: Starlette's
    BaseHTTPMiddleware would relay every streamed chunk through a queue."""

    def __init__(self, app: ASGIApp, paths: frozenset[str]):
        self.app = app
        self.paths = paths  # the app's routes'

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def record_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")
            # Requests RequireKey refused never reached the router: named by their path if it is a route's.
            endpoint = route.path if route is not None else scope["path"] if scope["path"] in self.paths else "other"
            metrics.REQUESTS.labels(endpoint=endpoint, status=str(status)).inc()
