"""One error shape for every failure: JSON {"message": ...} with the status of docs/api.md."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from unik.errors import UnikError, disk_full
from unik.models import ErrorBody

log = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "bad input",
        401: "a token is required, or the image hub refused the credentials",
        403: "the image hub denied access",
        404: "not found",
        409: "conflict",
        413: "the upload, or what it unpacks to, is too large",
        500: "internal fault",
        501: "the provider cannot do this",
        502: "the image hub failed or sent a damaged image",
        507: "the daemon's disk is full",
    }.items()
}


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UnikError)
    async def _unik_error(_: Request, exc: UnikError) -> JSONResponse:
        if exc.status >= 500 and exc.status != 501:
            log.error("internal error: %s", exc.message)
        return JSONResponse({"message": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # docs/api.md: validation failures are 400, never 422.
        return JSONResponse({"message": _describe_validation(exc)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # An upload that cannot be spooled to a full disk is not a malformed body.
        full = disk_full(exc.__cause__, _data_dir(request))
        if full is not None:
            return await _unik_error(request, full)
        return JSONResponse({"message": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        full = disk_full(exc, _data_dir(request))
        if full is not None:
            return await _unik_error(request, full)
        log.exception("unhandled error")
        return JSONResponse({"message": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


def _data_dir(request: Request) -> str:
    services = getattr(request.app.state, "services", None)
    return str(services.ctx.data_dir) if services is not None else "the data dir"
