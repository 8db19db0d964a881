"""GET /openapi.json: an OpenAPI 3.1 document built from the same pydantic models the routes validate requests with
and answer in, so it cannot drift from them (tests/serve/test_openapi.py also checks every route is described).
Routes that answer ad-hoc JSON (adapters, files, fine-tuning jobs) are described as JSON objects."""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from loraplex.serve.adapter_routes import (
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
)
from loraplex.serve.schemas import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    CreateFineTuningJobRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    VersionResponse,
)

JSON_OBJECT = {"type": "object"}
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


@dataclass(frozen=True)
class Operation:
    path: str
    method: str
    summary: str
    request: type[BaseModel] | tuple[type[BaseModel], ...] | dict | None = None  # a dict: a multipart form
    response: type[BaseModel] | dict | None = None  # None: no JSON body (health checks, metrics)
    stream: type[BaseModel] | None = None  # server-sent events of this model with stream: true
    media_type: str = "application/json"
    tags: tuple[str, ...] = field(default=())


def _form(**fields: dict) -> dict:
    return {"type": "object", "required": list(fields), "properties": fields}


BINARY = {"type": "string", "format": "binary"}
OPERATIONS = [
    Operation("/v1/chat/completions", "post", "Chat completion (OpenAI)", ChatCompletionRequest,
              ChatCompletionResponse, ChatCompletionChunk, tags=("inference",)),
    Operation("/v1/completions", "post", "Text completion (OpenAI); echo + logprobs scores prompts",
              CompletionRequest, CompletionResponse, CompletionResponse, tags=("inference",)),
    Operation("/v1/models", "get", "The base model and every adapter", response=ModelList, tags=("models",)),
    Operation("/v1/models/{model}", "get", "One served model or adapter", response=ModelCard, tags=("models",)),
    Operation("/tokenize", "post", "Tokenize a prompt or chat messages (vLLM)",
              (TokenizeCompletionRequest, TokenizeChatRequest), TokenizeResponse, tags=("utility",)),
    Operation("/detokenize", "post", "Token ids to text (vLLM)", DetokenizeRequest, DetokenizeResponse,
              tags=("utility",)),
    Operation("/version", "get", "The server's version", response=VersionResponse, tags=("utility",)),
    Operation("/health", "get", "200 while the engine lives", tags=("health",)),
    Operation("/ready", "get", "200 once the engine serves", tags=("health",)),
    Operation("/metrics", "get", "Prometheus metrics", media_type="text/plain", tags=("health",)),
    Operation("/status", "get", "Readiness, queue, KV cache, tokens/s and training share (the playground's strip)",
              response=JSON_OBJECT, tags=("health",)),
    Operation("/ui", "get", "The web playground (HTML; its files under /ui/static/)", media_type="text/html",
              tags=("playground",)),
    Operation("/", "get", "Redirects to /ui", media_type="text/html", tags=("playground",)),
    Operation("/v1/adapters", "post", "Upload a PEFT adapter archive (admin)",
              _form(name={"type": "string"}, file=BINARY), JSON_OBJECT, tags=("adapters",)),
    Operation("/v1/adapters", "get", "List adapters", response=JSON_OBJECT, tags=("adapters",)),
    Operation("/v1/adapters/{name}", "get", "One adapter's versions and residency", response=JSON_OBJECT,
              tags=("adapters",)),
    Operation("/v1/adapters/{name}", "delete", "Delete an adapter (admin)", response=JSON_OBJECT, tags=("adapters",)),
    Operation("/v1/adapters/{name}", "patch", "Edit an adapter's metadata: description, example prompts (admin)",
              {"type": "object", "required": ["metadata"], "additionalProperties": False, "properties": {
                  "metadata": {"type": "object", "additionalProperties": False, "properties": {
                      "description": {"type": ["string", "null"], "maxLength": 2000},
                      "examples": {"type": ["array", "null"], "maxItems": 20,
                                   "items": {"type": "string", "minLength": 1, "maxLength": 4000}}}}}},
              JSON_OBJECT, tags=("adapters",)),
    Operation("/v1/adapters/{name}/content", "get", "Download a version's PEFT folder as .tar.gz (admin)",
              response={"type": "string", "format": "binary"}, media_type="application/gzip", tags=("adapters",)),
    Operation("/v1/load_lora_adapter", "post", "Load an adapter folder from the server's disk (vLLM, admin)",
              LoadLoRAAdapterRequest, {"type": "string"}, media_type="text/plain", tags=("adapters",)),
    Operation("/v1/unload_lora_adapter", "post", "Unload an adapter (vLLM, admin)", UnloadLoRAAdapterRequest,
              {"type": "string"}, media_type="text/plain", tags=("adapters",)),
    Operation("/v1/files", "post", "Upload a training file (OpenAI)",
              _form(file=BINARY, purpose={"type": "string", "enum": ["fine-tune"]}), JSON_OBJECT,
              tags=("fine-tuning",)),
    Operation("/v1/files", "get", "List files", response=JSON_OBJECT, tags=("fine-tuning",)),
    Operation("/v1/files/{file_id}", "get", "One file", response=JSON_OBJECT, tags=("fine-tuning",)),
    Operation("/v1/files/{file_id}", "delete", "Delete a file", response=JSON_OBJECT, tags=("fine-tuning",)),
    Operation("/v1/files/{file_id}/content", "get", "A file's content", response={"type": "string"},
              media_type="application/octet-stream", tags=("fine-tuning",)),
    Operation("/v1/fine_tuning/jobs", "post", "Create a fine-tuning job (OpenAI)", CreateFineTuningJobRequest,
              JSON_OBJECT, tags=("fine-tuning",)),
    Operation("/v1/fine_tuning/jobs", "get", "List jobs", response=JSON_OBJECT, tags=("fine-tuning",)),
    Operation("/v1/fine_tuning/jobs/{job_id}", "get", "One job", response=JSON_OBJECT, tags=("fine-tuning",)),
    Operation("/v1/fine_tuning/jobs/{job_id}/events", "get", "A job's events", response=JSON_OBJECT,
              tags=("fine-tuning",)),
    Operation("/v1/fine_tuning/jobs/{job_id}/checkpoints", "get", "A job's checkpoints", response=JSON_OBJECT,
              tags=("fine-tuning",)),
    Operation("/v1/fine_tuning/jobs/{job_id}/cancel", "post", "Cancel a job", response=JSON_OBJECT,
              tags=("fine-tuning",)),
    Operation("/v1/fine_tuning/jobs/{job_id}/pause", "post", "Pause a job (OpenAI)", response=JSON_OBJECT,
              tags=("fine-tuning",)),
    Operation("/v1/fine_tuning/jobs/{job_id}/resume", "post", "Resume a paused job (OpenAI)", response=JSON_OBJECT,
              tags=("fine-tuning",)),
    Operation("/openapi.json", "get", "This document", response=JSON_OBJECT, tags=("utility",)),
]


def _models() -> list[type[BaseModel]]:
    found: list[type[BaseModel]] = []
    for op in OPERATIONS:
        for part in (op.request, op.response, op.stream):
            for model in part if isinstance(part, tuple) else (part,):
                if isinstance(model, type) and issubclass(model, BaseModel) and model not in found:
                    found.append(model)
    return found


def build_document() -> dict[str, Any]:
    models = _models()
    refs, top = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    schemas = dict(top.get("$defs", {}))
    schemas["ErrorResponse"] = ERROR

    def schema_of(part) -> dict:
        if isinstance(part, tuple):
            return {"oneOf": [schema_of(p) for p in part]}
        if isinstance(part, type):
            return refs[(part, "validation")]
        return part

    paths: dict[str, dict] = {}
    for op in OPERATIONS:
        entry: dict[str, Any] = {"summary": op.summary, "operationId": _operation_id(op), "tags": list(op.tags)}
        names = [seg[1:-1] for seg in op.path.split("/") if seg.startswith("{")]
        if names:
            entry["parameters"] = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                                   for n in names]
        if op.request is not None:
            media = "multipart/form-data" if isinstance(op.request, dict) else "application/json"
            entry["requestBody"] = {"required": True, "content": {media: {"schema": schema_of(op.request)}}}
        ok: dict[str, Any] = {"description": "OK"}
        content = {}
        if op.response is not None:
            content[op.media_type] = {"schema": schema_of(op.response)}
        elif op.media_type != "application/json":
            content[op.media_type] = {"schema": {"type": "string"}}
        if op.stream is not None:
            content["text/event-stream"] = {"schema": {"type": "string"},
                                            "description": f"data: lines of {op.stream.__name__}, then data: [DONE]"}
        if content:
            ok["content"] = content
        entry["responses"] = {"200": ok, "201": ok, "default": {
            "description": "An error, OpenAI's shape",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}}
        paths.setdefault(op.path, {})[op.method] = entry
    return {"openapi": "3.1.0",
            "info": {"title": "loraplex", "version": _version(),
                     "description": "One base LLM, many LoRA adapters, behind an OpenAI-compatible API."},
            "paths": paths, "components": {"schemas": schemas, "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"}}}}


def _operation_id(op: Operation) -> str:
    words = [w.strip("{}") for w in op.path.strip("/").replace(".", "_").split("/") if w]
    return "_".join([op.method, *words])


def _version() -> str:
    try:
        return version("loraplex")
    except PackageNotFoundError:
        return "unknown"


async def openapi(request: Request) -> JSONResponse:
    state = request.app.state
    if getattr(state, "openapi", None) is None:
        state.openapi = build_document()  # the same for the life of the process
    return JSONResponse(state.openapi)


OPENAPI_ROUTES = [Route("/openapi.json", openapi, methods=["GET"])]
