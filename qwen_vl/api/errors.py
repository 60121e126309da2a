"""Every error leaves the server as OpenAI's error object,
`{"error": {"message", "type", "param", "code"}}`, with a 4xx status for
anything the client can fix and never a stack trace."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .protocol import REFUSED, ErrorDetail, ErrorResponse

logger = logging.getLogger("qwen_vl.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(HTTPException):
    """An error for the client. An HTTPException, so that one raised while
    FastAPI reads the body (the body size limit) reaches its handler as itself
    instead of becoming FastAPI's generic 400."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(status, message, headers)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    detail = ErrorDetail(message=message, type=_TYPES.get(status, "server_error"), param=param, code=code)
    return ErrorResponse(error=detail).model_dump()


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


# Pydantic names the member of a union it tried ("str", "constrained-str",
# "list[...]") and a tagged union's tag in an error's location; the client's
# field path has neither.
_UNION_MEMBERS = ("str", "constrained-str", "int", "constrained-int", "float", "bool")


def _location(loc) -> str | None:
    parts, tag_at = [], None
    for i, part in enumerate(map(str, loc)):
        if "tagged-union[" in part:
            tag_at = i + (2 if part.startswith("list[") else 1)  # after the list index, if any
        if i == tag_at or part == "body" or part in _UNION_MEMBERS or "[" in part:
            continue
        parts.append(part)
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        # The deepest error: of a union's members, the one that got furthest.
        first = max(errors, key=lambda e: len(e.get("loc", ())), default={"loc": (), "msg": "invalid request"})
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(),
                                  None, "invalid_json")
        param = _location(first.get("loc", ()))
        reason = first.get("msg")
        if first.get("type") == "value_error":  # a validator's own text, without pydantic's "Value error, "
            reason = first.get("ctx", {}).get("error", reason)
        elif first.get("type") == "extra_forbidden":
            reason = "unknown field; this server does not serve it"
        elif param in REFUSED and first.get("type") in ("literal_error", "none_required"):
            reason = f"not supported: {REFUSED[param]} (only its default is accepted)"
        message = f"{param}: {reason}" if param else str(reason)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more error(s))"
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's json.loads of the body
            return error_response(400, f"the body is not valid UTF-8: {exc.__cause__.reason}", None, "invalid_json")
        # 405s carry Starlette's Allow header (RFC 9110).
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(500, "internal server error")
