"""Every error the server returns, in one envelope: `{"error": {"message", "type", "param", "code"}}`.

`code` is the integer HTTP status and `type` the vLLM-style class name (`BadRequestError`, ...), so
clients written against vLLM read our errors unchanged. Handlers installed here turn validation
failures into 400 (never 422), unknown routes into 404, a client gone mid-body into a quiet 499, and
anything unexpected into a 500 without a stack trace in the body (the trace goes to the log).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

logger = logging.getLogger("hybridserve.serve")

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error with its HTTP status; raise it anywhere in a handler."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None, type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers
        self.type = type or ERROR_TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def error_body(status: int, message: str, param: str | None = None, type: str | None = None) -> dict[str, Any]:
    etype = type or ERROR_TYPES.get(status, "Error")
    return {"error": {"message": message, "type": etype, "param": param, "code": status}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.type), status_code=err.status,
                        headers=err.headers)


def validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """A pydantic failure as a 400 naming the first offending parameter."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    # drop pydantic's union-branch names (e.g. "str", "list[int]") from the path
    loc = [x for x in loc if not (x[:1].islower() and ("[" in x or x in ("str", "int", "float", "bool")))]
    param = _dotted(loc) or None
    msg = first.get("msg", "invalid request")
    return bad_request(f"{param}: {msg}" if param else msg, param)


def _dotted(loc: list[str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _: ClientDisconnect) -> Response:  # hung up while sending its body
        logger.debug("client left during %s %s", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"Internal server error ({type(exc).__name__})"))
