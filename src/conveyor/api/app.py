"""The ASGI application: ``create_app(settings)`` and its lifespan.

The lifespan opens the store (refusing an out-of-date schema) and the queue factory and closes
them on shutdown. Tests and the server may instead pass an already open :class:`ApiContext`.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

from conveyor import tracing
from conveyor.api.console import install_console
from conveyor.api.context import ApiContext, open_context
from conveyor.api.errors import install_error_handlers
from conveyor.api.fastlane import FastLane
from conveyor.api.middleware import BodyLimitMiddleware, HttpMetrics, RequestMetricsMiddleware
from conveyor.api.routes import (
    admin,
    executions,
    health,
    limits,
    metrics,
    schedules,
    secrets,
    storage,
    webhooks,
    workflows,
)
from conveyor.runtime.prometheus import ConveyorCollector
from conveyor.settings import Settings
from conveyor.workflows.definition import workflow_json_schema

if TYPE_CHECKING:
    from fastapi.telemetry import TelemetryConfig

DESCRIPTION = """\
Conveyor runs multi-tenant workflows durably on BullMQ/Redis and a database.

**Authentication.** Tenant routes take `Authorization: Bearer <API key>` (keys are issued by
the admin API). Admin routes under `/api/admin` take `Authorization: Bearer <ADMIN_TOKEN>`; when
`ADMIN_TOKEN` is not configured they answer 503 `admin_disabled`. Inbound webhooks authenticate
with the workflow's webhook secret.

**Errors.** Every 4xx/5xx answer is `{"success": false, "error": {"code", "message",
"details"}}`. Objects of another tenant answer 404, exactly as absent ones.

**Probes.** `/api/health` (liveness; always answers) and `/api/health/ready` (readiness: 503
unless Redis answers, the queue driver is durable and the database answers).
"""

TAGS = [
    {"name": "health", "description": "Liveness and readiness probes."},
    {"name": "admin", "description": "Operator endpoints (ADMIN_TOKEN)."},
    {"name": "workflows", "description": "Workflow definitions and their versions."},
    {"name": "executions", "description": "Trigger, inspect, cancel and retry executions."},
    {"name": "schedules", "description": "Cron schedules that trigger workflows."},
    {"name": "webhooks", "description": "Inbound webhooks that trigger workflows."},
    {"name": "metrics", "description": "Prometheus metrics."},
]


def create_app(settings: Settings, *, context: ApiContext | None = None) -> FastAPI:
    """Build the API application.

    With ``context=None`` the lifespan opens (and closes) the store and queues itself;
    otherwise the given, already open context is used and left open.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if context is not None:
            app.state.ctx = context
            yield
            return
        async with open_context(settings) as ctx:
            app.state.ctx = ctx
            yield

    app = FastAPI(
        telemetry=fastapi_telemetry(),
        title="Conveyor API",
        version="0.1.0",
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url=None,  # served below from packaged assets: works offline and air-gapped
        redoc_url=None,
    )
    _serve_docs(app)
    install_console(app)  # the operations console under /console (docs/console.md)
    registry = CollectorRegistry()
    collector = ConveyorCollector()
    registry.register(collector)
    app.state.settings = settings
    app.state.registry = registry
    app.state.collector = collector
    install_error_handlers(app)
    # Innermost first: FastLane runs inside the body limit and the request metrics.
    app.add_middleware(FastLane, api=app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.api_max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=HttpMetrics(registry))
    routers = (health, admin, storage, limits, workflows, executions, schedules, secrets,
               webhooks, metrics)  # fmt: skip
    for module in routers:
        app.include_router(module.router)
    app.openapi = functools.partial(_openapi, app)  # type: ignore[method-assign]
    return app


def fastapi_telemetry() -> TelemetryConfig:
    """FastAPI's own OpenTelemetry signals, decided when the app is built: its request spans
    go to this process's provider while tracing is on (``docs/operations.md``, Tracing) and
    are off otherwise; its metrics and log signals are off (the API's metrics are
    Prometheus', its logs structured lines). Left to its defaults FastAPI asks at every request
    whether a global provider has been set since — three environment reads, ~2 % of the API's
    CPU under a stream of triggers."""
    provider = tracing.tracer_provider()
    if provider is None:
        return {"tracing": False, "metrics": False, "logs": False}
    return {"tracing": True, "tracer_provider": provider, "metrics": False, "logs": False}


DOCS_ASSETS = "/docs/assets"


def _serve_docs(app: FastAPI) -> None:
    """Swagger UI at ``/docs`` with its scripts and styles served by this process from the
    ``swagger-ui-bundle`` package — no CDN, so the page works offline and in air-gapped
    installs."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} — docs",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the workflow definition's own JSON Schema as a component
    (``WorkflowDefinition``), which the workflow create/update bodies reference."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    text = json.dumps(workflow_json_schema()).replace('"#/$defs/', '"#/components/schemas/')
    definition = json.loads(text)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in definition.pop("$defs", {}).items():
        if name in components:
            raise RuntimeError(f"OpenAPI component name clash: {name}")
        components[name] = schema
    definition.pop("$schema", None)
    definition.pop("$id", None)
    components["WorkflowDefinition"] = definition
    app.openapi_schema = doc
    return doc
