"""Baseline for scripts/bench.py: the coupon service's stack with an echo instead of a store.

    python scripts/echo_server.py --port 8081

The stack as it comes: the same generated Connect app, codecs, error interceptor and dispatch
as coupon.app, on uvicorn with its own HTTP protocol (1 worker, uvloop/httptools, no access
log); IssueCoupon answers at once with a code cut from the request and the current time (a
Timestamp, like the real reply). What the coupon server loses against this is everything it
adds to that stack: the service and store, and per call its request id, caller check, metrics
and HTTP read deadlines. What it gains is counted too: its HTTP protocol answers in one socket
write, where uvicorn's writes the head and the body apart (coupon/http_writes.py).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

# Run from a checkout without installing: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvicorn
from connectrpc.codec import proto_binary_codec, proto_json_codec
from protobuf.wkt import Timestamp

from coupon.gen.coupon_connect import CouponService, CouponServiceASGIApplication
from coupon.gen.coupon_pb import IssueCouponRequest, IssueCouponResponse
from coupon.rpc_errors import ErrorInterceptor

if TYPE_CHECKING:
    from connectrpc.request import RequestContext
    from starlette.types import ASGIApp, Receive, Scope, Send


class EchoService(CouponService):
    async def issue_coupon(
        self,
        request: IssueCouponRequest,
        ctx: RequestContext[IssueCouponRequest, IssueCouponResponse],
        /,
    ) -> IssueCouponResponse:
        return IssueCouponResponse(
            code=request.campaign_id[:10], issued_at=Timestamp.from_datetime(datetime.now(UTC))
        )


def create_echo_app() -> ASGIApp:
    connect_app = CouponServiceASGIApplication(
        EchoService(),
        interceptors=[ErrorInterceptor()],
        codecs=[proto_binary_codec(), proto_json_codec(ignore_unknown_fields=False)],
    )
    prefix = connect_app.path + "/"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(prefix):
            await connect_app(scope, receive, send)
        elif scope["type"] == "http":
            # /healthz, /readyz and anything else: 200, so bench.py can poll readiness.
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok\n"})
        elif scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Connect JSON echo baseline (loopback).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args(argv)
    # The settings coupon.server uses: 1 worker, uvloop/httptools (auto), no access log.
    uvicorn.run(
        create_echo_app(),
        host=args.host,
        port=args.port,
        access_log=False,
        server_header=False,
        log_level="warning",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
