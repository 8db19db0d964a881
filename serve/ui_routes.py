"""The web playground: GET /ui (one static page, our own ES modules plus vendored Preact+htm and uPlot, no build
step, nothing fetched from elsewhere), / redirecting there, and GET /status, the small JSON the page's status
strip polls. Every page response carries a strict Content-Security-Policy (scripts, styles and connections to
this origin only; no inline script or style, no eval). The page talks to the same /v1 API as any client, with
the key the user enters (kept in the browser's localStorage, sent as a Bearer header): auth is unchanged."""
from __future__ import annotations

import time
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

UI_DIR = Path(__file__).parent / "ui"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
                    "Cache-Control": "no-cache"}  # revalidated (ETag): a new server version is never served stale


class _UiFiles(StaticFiles):
    async def get_response(self, path: str, scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


async def ui_index(request: Request) -> Response:
    return FileResponse(UI_DIR / "index.html", media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


async def root(request: Request) -> Response:
    return RedirectResponse("/ui", status_code=307)


async def status(request: Request) -> Response:
    """What the status strip shows: readiness, queue, KV cache, generation tokens/s and the training share of
    the engine loop since the previous call (or the last 5 s; each caller's window is its own polling)."""
    state = request.app.state
    stats = state.engine.stats()
    now = time.monotonic()
    tokens = state.metrics.total_generation_tokens()
    previous = getattr(state, "_status_sample", None)
    state._status_sample = (now, tokens, stats.inference_seconds, stats.training_seconds)
    rate = share = None
    if previous is not None and now - previous[0] > 0.2:
        dt = now - previous[0]
        rate = max(0.0, (tokens - previous[1]) / dt)
        busy = (stats.inference_seconds - previous[2]) + (stats.training_seconds - previous[3])
        share = (stats.training_seconds - previous[3]) / busy if busy > 0 else 0.0
    jobs = None
    fine_tuning = getattr(state, "fine_tuning", None)
    if fine_tuning is not None:
        try:
            jobs = fine_tuning.store.count_by_status()
        except Exception:  # noqa: BLE001 - an unreachable store: the strip shows the engine anyway
            jobs = None
    return JSONResponse({
        "ready": bool(state.ready and state.engine.is_healthy), "model": state.served_model_names[0],
        "num_requests_running": stats.num_running, "num_requests_waiting": stats.num_waiting,
        "kv_cache_usage": round(stats.kv_cache_usage, 4),
        "generation_tokens_per_s": None if rate is None else round(rate, 1),
        "training_share": None if share is None else round(share, 3),
        "fine_tuning_jobs": jobs,
    }, headers={"Cache-Control": "no-store"})


UI_ROUTES = [
    Route("/", root, methods=["GET"]),
    Route("/ui", ui_index, methods=["GET"]),
    Route("/status", status, methods=["GET"]),
    Mount("/ui/static", app=_UiFiles(directory=UI_DIR), name="ui-static"),
]
