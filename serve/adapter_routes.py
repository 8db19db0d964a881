"""Adapter endpoints: our `/v1/adapters` (multipart upload, list, get, delete) and vLLM's
`/v1/load_lora_adapter` / `/v1/unload_lora_adapter`. Parse, call AdapterService, format."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive

from loraplex.adapters.errors import AdapterTooLargeError
from loraplex.serve.errors import InvalidRequestError

MULTIPART_OVERHEAD_BYTES = 64 << 10  # form fields and part headers around the archive


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str


def _service(request: Request) -> Any:
    service = request.app.state.adapters
    if service is None:
        raise InvalidRequestError("this server runs without LoRA support (started with --no-enable-lora)",
                                  code="lora_disabled")
    return service


def limited_receive(receive: Receive, max_bytes: int, on_too_large: Callable[[], None]) -> Receive:
    """The request body, cut off by `on_too_large()` (which raises a 413 error) as soon as it grows past
    `max_bytes` (Content-Length may lie). Shared by adapter and training-file uploads."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > max_bytes:
                on_too_large()
        return message
    return wrapped


def _raise_adapter_too_large(max_bytes: int) -> None:
    raise AdapterTooLargeError(f"the upload is larger than the {max_bytes >> 20} MiB limit", param="file")


def _form_metadata(form) -> dict | None:
    """The upload's optional metadata fields: `description` (text) and `examples` (a JSON array of prompts)."""
    description, examples = form.get("description"), form.get("examples")
    if description is None and examples is None:
        return None
    metadata: dict = {}
    if description is not None:
        if not isinstance(description, str):
            raise InvalidRequestError("the form field `description` must be text", param="description")
        metadata["description"] = description
    if examples is not None:
        try:
            metadata["examples"] = json.loads(examples) if isinstance(examples, str) else None
        except json.JSONDecodeError:
            metadata["examples"] = None
        if not isinstance(metadata["examples"], list):
            raise InvalidRequestError("the form field `examples` must be a JSON array of prompts", param="examples")
    return metadata


async def update_adapter(request: Request) -> Response:
    """PATCH /v1/adapters/{name}: {"metadata": {"description": ..., "examples": [...]}} merged into the adapter's
    metadata (a field set to null is removed); -> the adapter as GET shows it."""
    service = _service(request)
    try:
        body = json.loads(await request.body())
    except json.JSONDecodeError:
        raise InvalidRequestError("the body must be JSON: {\"metadata\": {\"description\": ..., "
                                  "\"examples\": [...]}}") from None
    if not isinstance(body, dict) or set(body) != {"metadata"}:
        raise InvalidRequestError("the body must be {\"metadata\": {...}} (only metadata can change; publish a new "
                                  "version for new weights)", param="metadata")
    name = request.path_params["name"]
    await service.update_metadata(name, body["metadata"])
    return JSONResponse(await service.describe(name))


async def upload_adapter(request: Request) -> Response:
    service = _service(request)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequestError("send the adapter as multipart/form-data with fields `name` and `file` "
                                  "(a .zip or .tar.gz of a PEFT folder)")
    max_body = service.settings.upload_limits.max_archive_bytes + MULTIPART_OVERHEAD_BYTES
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise AdapterTooLargeError(f"the upload is larger than the {max_body >> 20} MiB limit", param="file")
    limited = Request(request.scope, limited_receive(request.receive, max_body,
                                                     lambda: _raise_adapter_too_large(max_body)))
    form = await limited.form(max_files=1, max_fields=8)
    try:
        name, upload = form.get("name"), form.get("file")
        metadata = _form_metadata(form)
        if not isinstance(name, str) or not name:
            raise InvalidRequestError("the form field `name` (the adapter's name) is required", param="name")
        if not isinstance(upload, UploadFile):
            raise InvalidRequestError("the form field `file` (a .zip or .tar.gz of a PEFT folder) is required",
                                      param="file")
        fd, tmp = tempfile.mkstemp(prefix="upload-", dir=service.settings.adapter_dir / "tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                await asyncio.to_thread(shutil.copyfileobj, upload.file, out, 1 << 20)
            version = await service.upload(name, Path(tmp), metadata)
        finally:
            os.unlink(tmp)
    finally:
        await form.close()
    return JSONResponse({**service.summary(version.name),
                         "metadata": await asyncio.to_thread(service.store.metadata, version.name)}, status_code=201)


async def list_adapters(request: Request) -> Response:
    service = _service(request)
    return JSONResponse({"object": "list", "data": await service.summaries()})


async def get_adapter(request: Request) -> Response:
    return JSONResponse(await _service(request).describe(request.path_params["name"]))


async def download_adapter(request: Request) -> Response:
    """The PEFT folder of one version (default: the newest) as a .tar.gz: adapter_config.json and
    adapter_model.safetensors, loadable by peft and vLLM as they are."""
    raw = request.query_params.get("version")
    if raw is not None and not raw.isdigit():
        raise InvalidRequestError(f"version must be a positive integer; got {raw!r}", param="version")
    name = request.path_params["name"]
    path = await _service(request).archive(name, None if raw is None else int(raw))
    filename = f"{name.replace(':', '_')}.tar.gz"
    return FileResponse(path, media_type="application/gzip", filename=filename,
                        background=BackgroundTask(os.unlink, path))


async def delete_adapter(request: Request) -> Response:
    name = request.path_params["name"]
    removed = await _service(request).remove(name)
    return JSONResponse({"id": name, "object": "adapter", "deleted": True, "versions": len(removed)})


async def load_lora_adapter(request: Request) -> Response:
    req = LoadLoRAAdapterRequest.model_validate_json(await request.body())
    service = _service(request)
    await service.publish_folder(req.lora_name, Path(req.lora_path), allow_bin=True, replace=req.load_inplace)
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")


async def unload_lora_adapter(request: Request) -> Response:
    req = UnloadLoRAAdapterRequest.model_validate_json(await request.body())
    await _service(request).remove(req.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")


# (path, method) pairs that change state: with --admin-api-key they need that key
# (downloads too: an adapter is the product of someone's data and compute)
ADMIN_ROUTES = {("/v1/adapters", "POST"), ("/v1/adapters/*", "DELETE"), ("/v1/adapters/*", "PATCH"),
                ("/v1/load_lora_adapter", "POST"),
                ("/v1/unload_lora_adapter", "POST")}


def is_admin_route(path: str, method: str) -> bool:
    if (path, method) in ADMIN_ROUTES:
        return True
    if path.startswith("/v1/adapters/") and path.rstrip("/").endswith("/content") and method == "GET":
        return True
    return path.startswith("/v1/adapters/") and ("/v1/adapters/*", method) in ADMIN_ROUTES


ADAPTER_ROUTES = [
    Route("/v1/adapters", upload_adapter, methods=["POST"]),
    Route("/v1/adapters", list_adapters, methods=["GET"]),
    Route("/v1/adapters/{name}", get_adapter, methods=["GET"]),
    Route("/v1/adapters/{name}", delete_adapter, methods=["DELETE"]),
    Route("/v1/adapters/{name}", update_adapter, methods=["PATCH"]),
    Route("/v1/adapters/{name}/content", download_adapter, methods=["GET"]),
    Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
    Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
]
