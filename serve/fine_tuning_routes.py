"""Fine-tuning endpoints in OpenAI's shapes: `/v1/files` (multipart upload, list, get, content, delete) and
`/v1/fine_tuning/jobs` (create, list with a metadata filter, get, events, checkpoints, cancel, pause, resume). Parse, call FineTuningService, format."""
from __future__ import annotations

from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from loraplex.serve.adapter_routes import limited_receive
from loraplex.serve.errors import InvalidRequestError
from loraplex.serve.fine_tuning_service import raise_too_large
from loraplex.serve.schemas import CreateFineTuningJobRequest

MULTIPART_OVERHEAD_BYTES = 64 << 10  # the purpose field and part headers around the file
MAX_PAGE_LIMIT = 100


def _service(request: Request) -> Any:
    service = request.app.state.fine_tuning
    if service is None:
        raise InvalidRequestError("this server runs without fine-tuning (started with --no-enable-training or "
                                  "--no-enable-lora)", code="fine_tuning_disabled")
    return service


def _page(request: Request, default_limit: int) -> tuple[str | None, int]:
    """OpenAI's cursor pagination: `after` (an id from the previous page) and `limit` (1 to 100)."""
    after = request.query_params.get("after") or None
    raw = request.query_params.get("limit")
    if raw is None:
        return after, default_limit
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE_LIMIT:
        raise InvalidRequestError(f"limit must be an integer from 1 to {MAX_PAGE_LIMIT}; got {raw!r}", param="limit")
    return after, int(raw)


def _list(data: list[dict], has_more: bool = False) -> JSONResponse:
    return JSONResponse({"object": "list", "data": data, "has_more": has_more,
                         "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})


# ---- files ------------------------------------------------------------------------------------------

async def upload_file(request: Request) -> Response:
    service = _service(request)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequestError("send the file as multipart/form-data with fields `file` (JSONL training data) "
                                  "and `purpose` (\"fine-tune\")")
    max_file = service.settings.max_file_bytes
    max_body = max_file + MULTIPART_OVERHEAD_BYTES
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise_too_large(max_file)
    form = await Request(request.scope, limited_receive(request.receive, max_body, lambda: raise_too_large(max_file))).form(max_files=1,
                                                                                          max_fields=8)
    try:
        purpose, upload = form.get("purpose"), form.get("file")
        if not isinstance(purpose, str) or not purpose:
            raise InvalidRequestError('the form field `purpose` is required (use "fine-tune")', param="purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequestError("the form field `file` (the training data) is required", param="file")
        data = await upload.read(max_file + 1)
        record = await service.add_file(data, upload.filename, purpose)
    finally:
        await form.close()
    return JSONResponse(record.to_openai())


async def list_files(request: Request) -> Response:
    purpose = request.query_params.get("purpose") or None
    files = await _service(request).list_files(purpose)
    return _list([f.to_openai() for f in files])


async def get_file(request: Request) -> Response:
    return JSONResponse((await _service(request).get_file(request.path_params["file_id"])).to_openai())


async def get_file_content(request: Request) -> Response:
    service = _service(request)
    file_id = request.path_params["file_id"]
    path = await service.file_path(file_id)
    return FileResponse(path, media_type="application/octet-stream")


async def delete_file(request: Request) -> Response:
    file_id = request.path_params["file_id"]
    await _service(request).delete_file(file_id)
    return JSONResponse({"object": "file", "id": file_id, "deleted": True})


# ---- jobs -------------------------------------------------------------------------------------------

async def create_job(request: Request) -> Response:
    service = _service(request)
    req = CreateFineTuningJobRequest.model_validate_json(await request.body())
    job = await service.create_job(req)
    return JSONResponse(job.to_openai())


def _metadata_filter(request: Request) -> dict[str, str] | None:
    """OpenAI's `metadata[key]=value` query parameters (every pair must match)."""
    out = {}
    for key, value in request.query_params.multi_items():
        if key.startswith("metadata[") and key.endswith("]") and len(key) > len("metadata[]"):
            out[key[len("metadata["):-1]] = value
        elif key == "metadata":
            raise InvalidRequestError("filter by metadata as metadata[key]=value", param="metadata")
    return out or None


async def list_jobs(request: Request) -> Response:
    after, limit = _page(request, 20)
    jobs, has_more = await _service(request).list_jobs(after, limit, _metadata_filter(request))
    return _list([job.to_openai() for job in jobs], has_more)


async def get_job(request: Request) -> Response:
    return JSONResponse((await _service(request).get_job(request.path_params["job_id"])).to_openai())


async def list_events(request: Request) -> Response:
    after, limit = _page(request, 20)
    events, has_more = await _service(request).list_events(request.path_params["job_id"], after, limit)
    return _list(events, has_more)


async def list_checkpoints(request: Request) -> Response:
    after, limit = _page(request, 10)
    checkpoints, has_more = await _service(request).list_checkpoints(request.path_params["job_id"], after, limit)
    return _list(checkpoints, has_more)


async def cancel_job(request: Request) -> Response:
    return JSONResponse((await _service(request).cancel(request.path_params["job_id"])).to_openai())


async def pause_job(request: Request) -> Response:
    return JSONResponse((await _service(request).pause(request.path_params["job_id"])).to_openai())


async def resume_job(request: Request) -> Response:
    return JSONResponse((await _service(request).resume(request.path_params["job_id"])).to_openai())


def is_fine_tuning_admin_route(path: str, method: str) -> bool:
    """Endpoints that change files or jobs: with --admin-api-key they need that key."""
    path = path.rstrip("/")
    if method == "POST":
        return path in ("/v1/files", "/v1/fine_tuning/jobs") or (
            path.startswith("/v1/fine_tuning/jobs/") and path.endswith(("/cancel", "/pause", "/resume")))
    return method == "DELETE" and path.startswith("/v1/files/")


FINE_TUNING_ROUTES = [
    Route("/v1/files", upload_file, methods=["POST"]),
    Route("/v1/files", list_files, methods=["GET"]),
    Route("/v1/files/{file_id}", get_file, methods=["GET"]),
    Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
    Route("/v1/files/{file_id}/content", get_file_content, methods=["GET"]),
    Route("/v1/fine_tuning/jobs", create_job, methods=["POST"]),
    Route("/v1/fine_tuning/jobs", list_jobs, methods=["GET"]),
    Route("/v1/fine_tuning/jobs/{job_id}", get_job, methods=["GET"]),
    Route("/v1/fine_tuning/jobs/{job_id}/events", list_events, methods=["GET"]),
    Route("/v1/fine_tuning/jobs/{job_id}/checkpoints", list_checkpoints, methods=["GET"]),
    Route("/v1/fine_tuning/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
    Route("/v1/fine_tuning/jobs/{job_id}/pause", pause_job, methods=["POST"]),
    Route("/v1/fine_tuning/jobs/{job_id}/resume", resume_job, methods=["POST"]),
]
