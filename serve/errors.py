"""Every error the service answers is JSON ``{"error", "status", ...}``; never a stack trace."""
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("lookalike.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers, extra


def _error(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, "status": status, **extra}, status_code=status, headers=headers)


async def _api_error(_: Request, exc: ApiError):
    return _error(exc.status, exc.message, exc.headers, **exc.extra)


async def _validation_error(_: Request, exc: RequestValidationError):
    parts = ["{}: {}".format(".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()]
    return _error(422, "; ".join(parts))


async def _http_error(_: Request, exc: StarletteHTTPException):
    return _error(exc.status_code, str(exc.detail))


async def _unexpected(_: Request, exc: Exception):
    log.exception("unhandled error")
    return _error(500, f"internal error ({type(exc).__name__}); see the replica log")


def install(api: FastAPI) -> None:
    api.add_exception_handler(ApiError, _api_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(Exception, _unexpected)
