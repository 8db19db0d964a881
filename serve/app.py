"""build_app: the Starlette app around one engine (lifespan, auth, routes, error handlers, metrics)."""
from __future__ import annotations

import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from loraplex.serve.adapter_routes import ADAPTER_ROUTES, is_admin_route
from loraplex.serve.errors import EXCEPTION_HANDLERS, AuthenticationError, openai_error_response
from loraplex.serve.fine_tuning_routes import FINE_TUNING_ROUTES, is_fine_tuning_admin_route
from loraplex.serve.metrics import HttpMetricsMiddleware, ServingMetrics
from loraplex.serve.routes import ROUTES
from loraplex.serve.openapi import OPENAPI_ROUTES
from loraplex.serve.ui_routes import UI_ROUTES
from loraplex.serve.utility_routes import UTILITY_ROUTES

logger = logging.getLogger("loraplex.serve")


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on /v1/*; health, readiness and metrics stay open. With an
    admin key, the endpoints that change adapters (upload, delete, load, unload) or fine-tuning files and
    jobs (upload, delete, create, cancel) take only that key; the admin key is accepted everywhere else too."""

    def __init__(self, app: ASGIApp, api_key: str | None, admin_api_key: str | None = None) -> None:
        self.app = app
        self._user = None if api_key is None else f"Bearer {api_key}".encode()
        self._admin = None if admin_api_key is None else f"Bearer {admin_api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(GUARDED_PREFIXES) and scope["method"] != "OPTIONS":
            given = Headers(scope=scope).get("authorization", "").encode()
            admin_ok = self._admin is not None and secrets.compare_digest(given, self._admin)
            if self._admin is not None and _is_admin(scope["path"], scope["method"]):
                allowed = admin_ok
            else:
                allowed = self._user is None or admin_ok or secrets.compare_digest(given, self._user)
            if not allowed:
                await openai_error_response(AuthenticationError())(scope, receive, send)
                return
        await self.app(scope, receive, send)


GUARDED_PREFIXES = ("/v1", "/tokenize", "/detokenize")  # /health, /ready, /metrics and /version stay open


def _is_admin(path: str, method: str) -> bool:
    return is_admin_route(path, method) or is_fine_tuning_admin_route(path, method)


def build_app(engine: Any, served_model_names: list[str], api_key: str | None = None, *,
              admin_api_key: str | None = None, adapters: Any = None,
              lora_modules: dict[str, str] | None = None, fine_tuning: Any = None) -> Starlette:
    """`engine` is an AsyncEngine (or anything with its surface); it is started and stopped by the
    app's lifespan. The first served name is the default when a request leaves `model` out.
    `adapters`: an AdapterService (None: no LoRA); `lora_modules` are published at start-up.
    `fine_tuning`: a FineTuningService (None: the fine-tuning endpoints answer 400)."""
    if not served_model_names:
        raise ValueError("served_model_names must name at least one model")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await engine.start()
        if adapters is not None:
            await adapters.start(lora_modules)
        if fine_tuning is not None:
            await fine_tuning.start()
        app.state.ready = True
        logger.info("serving %s (max_model_len=%d)", ", ".join(served_model_names), engine.max_model_len)
        try:
            yield
        finally:
            app.state.ready = False
            if fine_tuning is not None:
                await fine_tuning.close()
            if adapters is not None:
                await adapters.stop_following()
            await engine.shutdown()
            if adapters is not None:
                adapters.close()

    middleware = [Middleware(HttpMetricsMiddleware)]
    if api_key or admin_api_key:
        middleware.append(Middleware(ApiKeyMiddleware, api_key=api_key, admin_api_key=admin_api_key))
    app = Starlette(routes=ROUTES + ADAPTER_ROUTES + FINE_TUNING_ROUTES + UTILITY_ROUTES + OPENAPI_ROUTES + UI_ROUTES,
                    middleware=middleware,
                    exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    app.state.engine = engine
    app.state.adapters = adapters
    app.state.fine_tuning = fine_tuning
    app.state.served_model_names = list(served_model_names)
    app.state.metrics = ServingMetrics(engine.stats, served_model_names[0])
    if fine_tuning is not None:
        app.state.metrics.watch_fine_tuning(fine_tuning.store)
    app.state.created = int(time.time())
    app.state.ready = False
    return app
