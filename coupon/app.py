"""The ASGI application: Connect routes plus health endpoints, around one store."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from typing import TYPE_CHECKING, cast

from connectrpc.codec import proto_binary_codec, proto_json_codec
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from coupon.auth import Authenticator
from coupon.call_interceptor import CallInterceptor
from coupon.config import Config, ConfigError, load_config
from coupon.early_refusals import METHOD as EARLY_REFUSED_METHOD
from coupon.early_refusals import EarlyRefusals
from coupon.gen.coupon_connect import CouponServiceASGIApplication
from coupon.metrics import flush_calls
from coupon.metrics import render as render_metrics
from coupon.refusing_campaigns import RefusingCampaigns
from coupon.rpc_errors import ErrorInterceptor
from coupon.service import CouponServiceImpl
from coupon.store.memory import MemoryStore
from coupon.webhooks.runtime import Webhooks, build_webhooks

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.requests import Request
    from starlette.types import ASGIApp, Receive, Scope, Send

    from coupon.store import Store

log = logging.getLogger("coupon.app")

CONFIG_PATH_ENV = "COUPON_CONFIG_PATH"

YOUNG_COLLECTION_THRESHOLD = 10_000  # see tune_garbage_collection


def build_store(config: Config, webhooks: Webhooks | None = None) -> Store:
    webhooks = webhooks or Webhooks()
    if config.store.type == "memory":
        return MemoryStore(outbox=webhooks.memory)
    if config.store.type == "postgres":
        # Imported here so the memory store runs without the database driver loaded.
        from coupon.store.postgres import PostgresStore

        return PostgresStore(config.database, outbox=webhooks.postgres)
    raise ConfigError(f"store.type {config.store.type!r} is not available in this build")


def create_app(
    config: Config, store: Store | None = None, refusing: RefusingCampaigns | None = None
) -> ASGIApp:
    """Build the app; the store opens at start-up and closes at shutdown (ASGI lifespan).
    Tests pass their own store, and `refusing` with a clock of their own."""
    webhooks = build_webhooks(config) if store is None else Webhooks()
    the_store = store if store is not None else build_store(config, webhooks)
    # Deliveries run in the server processes unless a `--role webhooks` process does them.
    delivery = webhooks.runner() if config.webhooks.deliver_in_server else None
    authenticator = Authenticator(config.auth)
    binary_codec = proto_binary_codec()
    # Unknown JSON fields are refused: a misspelt "startTime" must not start a campaign now.
    json_codec = proto_json_codec(ignore_unknown_fields=False)
    refusing = refusing if refusing is not None else RefusingCampaigns()
    connect_app = CouponServiceASGIApplication(
        CouponServiceImpl(the_store, config.limits, refusing),
        # The metadata interceptor first: it runs before the body is parsed, so metrics count
        # every call and a missing credential is refused without reading the body.
        interceptors=[CallInterceptor(authenticator), ErrorInterceptor()],
        codecs=[binary_codec, json_codec],
        read_max_bytes=config.limits.max_request_bytes,
    )

    async def healthz(_: Request) -> PlainTextResponse:
        return PlainTextResponse("ok\n")

    async def readyz(_: Request) -> PlainTextResponse:
        if await the_store.is_ready():
            return PlainTextResponse("ready\n")
        return PlainTextResponse("store unavailable\n", status_code=503)

    async def metrics_endpoint(_: Request) -> Response:
        body, content_type = render_metrics()
        return Response(body, media_type=content_type)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await the_store.open()
        if delivery is not None:
            await delivery.start()
        try:
            yield
        finally:
            if delivery is not None:
                await delivery.stop()  # POSTs in flight finish or go back to the queue
            await the_store.close()
            flush_calls()  # the last calls' counts, for a worker's metrics file

    # Starlette owns the lifespan; the Connect app is called directly rather than mounted,
    # which would both hide lifespan from it and cost a routing pass on the hot path.
    side_routes = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_endpoint),
        ],
        lifespan=lifespan,
    )
    connect_prefix = connect_app.path + "/"
    # connectrpc annotates with asgiref's precise ASGI types (installed with procrastinate);
    # Starlette's looser ones describe the same calls.
    connect_asgi = cast("ASGIApp", connect_app)
    issue_path = connect_prefix + EARLY_REFUSED_METHOD
    issue_app = EarlyRefusals(
        connect_asgi,
        store=the_store,
        authenticator=authenticator,
        codecs={b"application/proto": binary_codec, b"application/json": json_codec},
        max_request_bytes=config.limits.max_request_bytes,
        refusing=refusing,
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(connect_prefix):
            # The extension first: a server that has it (pyvoy) skips the header scan.
            if _TRAILERS not in (scope.get("extensions") or {}) and _is_native_grpc(scope):
                await _NATIVE_GRPC_REFUSAL(scope, receive, send)
                return
            # Only while some campaign refuses (refusing.entries) is a call looked at first.
            if scope["path"] == issue_path and refusing.entries:
                await issue_app(scope, receive, send)
                return
            await connect_asgi(scope, receive, send)
        else:
            await side_routes(scope, receive, send)

    return app


# Native gRPC needs HTTP/2 trailers, which uvicorn does not send (server.engine: pyvoy does);
# without this refusal the runtime fails inside the call and logs a traceback. gRPC-Web carries
# its trailers in the body and works everywhere, as do Connect JSON and binary.
_TRAILERS = "http.response.trailers"
_NATIVE_GRPC_REFUSAL = PlainTextResponse(
    "native gRPC (HTTP/2 trailers) is not served by this server (server.engine: uvicorn); "
    "use the Connect protocol or gRPC-Web, or run it with server.engine: pyvoy\n",
    status_code=415,
    headers={"Accept-Post": "application/json, application/proto, application/grpc-web"},
)


def request_content_type(scope: Scope) -> bytes:
    """The request's Content-Type as sent (b"" without one)."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            return bytes(value)
    return b""


def _is_native_grpc(scope: Scope) -> bool:
    content_type = request_content_type(scope)
    return content_type.startswith(b"application/grpc") and not content_type.startswith(
        b"application/grpc-web"
    )


def app_from_environment() -> ASGIApp:
    """Factory for uvicorn worker processes, which re-read the config the parent named."""
    app = create_app(load_config(os.environ.get(CONFIG_PATH_ENV) or None))
    tune_garbage_collection()
    return app


def tune_garbage_collection() -> None:
    """Garbage collection for a server process, called once its app is built.

    What the process has built by now (modules, the app, the pools) is exempt from collection:
    it lives as long as the process, yet every full collection rescanned it, a pause of about
    20 ms each with the Postgres store and webhooks loaded, felt at the tail of the latency.

    The youngest generation is collected after YOUNG_COLLECTION_THRESHOLD more tracked objects
    than were freed, not 700: calls free nearly all they allocate (their cycles are broken,
    coupon.call_interceptor), so the net growth comes mostly from what the memory store keeps,
    and every 700 of it set off a collection whose older-generation cascade rescanned the
    whole store: 3.5% of the memory-store server's CPU, with 60 ms full collections.

    Only for server processes: a test building many apps would keep its garbage."""
    gc.collect()  # start-up's own garbage first, so it is not frozen with the rest
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, oldest)
