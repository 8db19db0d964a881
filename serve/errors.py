"""The one place that turns exceptions into OpenAI error JSON: {"error": {message, type, param, code}}."""
from __future__ import annotations

import logging
import re

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from loraplex.adapters.errors import AdapterError
from loraplex.engine.core.errors import (
    EngineDeadError,
    PromptTooLongError,
    QueueFullError,
    ReplicaFailedError,
)
from loraplex.storage.database import StorageUnavailableError
from loraplex.trainer.job_store import FileInUseError, InvalidTransitionError
from loraplex.trainer.job_store import NotFoundError as StoreNotFoundError

logger = logging.getLogger("loraplex.serve")


class OpenAIError(Exception):
    """An error raised by the HTTP layer itself, already carrying its status and OpenAI fields."""
    status_code = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequestError(OpenAIError):
    pass


class ModelNotFoundError(OpenAIError):
    status_code = 404
    code = "model_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"The model `{name}` does not exist.", param="model")


class NotFoundError(OpenAIError):
    status_code = 404


class ConflictError(OpenAIError):
    status_code = 409


class RequestTooLargeError(OpenAIError):
    status_code = 413
    code = "request_too_large"


class ServiceUnavailableError(OpenAIError):
    status_code = 503
    type = "service_unavailable_error"


class AuthenticationError(OpenAIError):
    status_code = 401
    code = "invalid_api_key"

    def __init__(self) -> None:
        super().__init__("Incorrect or missing API key; send it as 'Authorization: Bearer <key>'.")


class ClientDisconnectedError(OpenAIError):
    """The client went away before its answer was ready; nobody reads this response."""
    status_code = 499
    code = "client_disconnected"

    def __init__(self) -> None:
        super().__init__("client disconnected")


def error_response(status_code: int, message: str, *, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status_code, headers=headers)


# pydantic puts union members ('str', 'list[int]', 'TextContentPart') into error locations; they are
# left out so `param` reads like the JSON the client wrote: messages[0].content[0].type
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param_from_loc(loc: tuple) -> str | None:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in _TYPE_TAGS and re.fullmatch(r"[a-z_][a-z0-9_]*", part):
            path += f".{part}" if path else part
    return path or None


async def _validation_error(request: Request, exc: ValidationError) -> JSONResponse:
    errors = exc.errors(include_url=False)
    if errors[0]["type"] == "json_invalid":
        return error_response(400, f"Invalid JSON body: {errors[0]['msg']}")
    # a value that fits no member of a union fails once per member: report the deepest, most specific
    field = errors[0]["loc"][:1]
    error = max((e for e in errors if e["loc"][:1] == field), key=lambda e: len(e["loc"]))
    param = _param_from_loc(tuple(error["loc"]))
    msg = error["msg"].removeprefix("Value error, ")
    return error_response(400, f"{param}: {msg}" if param else msg, param=param)


def openai_error_response(exc: OpenAIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthenticationError) else None
    return error_response(exc.status_code, exc.message, type=exc.type, param=exc.param,
                          code=exc.code, headers=headers)


async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
    return openai_error_response(exc)


async def _value_error(request: Request, exc: ValueError) -> JSONResponse:
    # SamplingParams and EngineArgs phrase errors as "<field> must ..."; name the field when we can.
    match = re.match(r"([a-z_]+) must\b", str(exc))
    return error_response(400, str(exc), param=match.group(1) if match else None)


async def _prompt_too_long(request: Request, exc: PromptTooLongError) -> JSONResponse:
    return error_response(400, str(exc), param="messages" if "chat" in request.url.path else "prompt",
                          code="context_length_exceeded")


async def _adapter_error(request: Request, exc: AdapterError) -> JSONResponse:
    type_ = "invalid_request_error" if exc.status_code < 500 else "service_unavailable_error"
    return error_response(exc.status_code, exc.message, type=type_, param=exc.param, code=exc.code)


async def _store_not_found(request: Request, exc: StoreNotFoundError) -> JSONResponse:
    return error_response(404, exc.message, param=exc.param)


async def _file_in_use(request: Request, exc: FileInUseError) -> JSONResponse:
    return error_response(409, str(exc), param="file_id", code="file_in_use")


async def _invalid_transition(request: Request, exc: InvalidTransitionError) -> JSONResponse:
    # a job changed state under the request (the engine side finished or cancelled it meanwhile)
    return error_response(409, str(exc), code="invalid_job_status")


async def _queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
    return error_response(429, str(exc), type="rate_limit_error", code="queue_full",
                          headers={"Retry-After": str(exc.retry_after_s)})


async def _engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
    if isinstance(exc, ReplicaFailedError):
        logger.warning("%s", exc)
        return error_response(503, ReplicaFailedError.message, type="service_unavailable_error",
                              code="replica_failed")
    logger.error("engine is dead: %s", exc)
    return error_response(503, "The inference engine has stopped; the server cannot take requests.",
                          type="service_unavailable_error", code="engine_dead")


async def _storage_unavailable(request: Request, exc: StorageUnavailableError) -> JSONResponse:
    logger.error("%s %s: %s", request.method, request.url.path, exc)
    return error_response(503, f"{exc}; nothing was changed, try again later.", type="service_unavailable_error",
                          code="storage_unavailable", headers={"Retry-After": "5"})


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(exc.status_code, str(exc.detail), type=type_, headers=exc.headers)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises after this response is sent, so the ASGI server logs the traceback.
    logger.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path)
    return error_response(500, "Internal server error.", type="server_error", code="internal_error")


EXCEPTION_HANDLERS = {
    OpenAIError: _openai_error,
    ValidationError: _validation_error,
    PromptTooLongError: _prompt_too_long,
    AdapterError: _adapter_error,
    StoreNotFoundError: _store_not_found,
    FileInUseError: _file_in_use,
    InvalidTransitionError: _invalid_transition,
    ValueError: _value_error,
    QueueFullError: _queue_full,
    EngineDeadError: _engine_dead,
    StorageUnavailableError: _storage_unavailable,
    HTTPException: _http_error,
    Exception: _unhandled,
}


def error_json(exc: BaseException) -> dict:
    """The error body for an exception raised after an SSE stream has started (status already sent)."""
    if isinstance(exc, OpenAIError):
        return {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    if isinstance(exc, ReplicaFailedError):
        return {"error": {"message": ReplicaFailedError.message, "type": "service_unavailable_error",
                          "param": None, "code": "replica_failed"}}
    if isinstance(exc, EngineDeadError):
        return {"error": {"message": "The inference engine has stopped.", "type": "service_unavailable_error",
                          "param": None, "code": "engine_dead"}}
    logger.exception("error while streaming")
    return {"error": {"message": "Internal server error.", "type": "server_error", "param": None,
                      "code": "internal_error"}}
