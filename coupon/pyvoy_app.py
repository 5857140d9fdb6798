"""The ASGI app as `server.engine: pyvoy` loads it: inside each Envoy process, at import.

pyvoy imports `module:attr` in the interpreter it embeds in Envoy and has no factory option, so
this module builds the app when imported, from the config file the parent named (the same
variable uvicorn's workers read), and sets up logging there, since that interpreter starts
with none.
"""

from __future__ import annotations

import asyncio
import logging.config
import os
from typing import TYPE_CHECKING

from coupon.app import CONFIG_PATH_ENV, create_app
from coupon.config import load_config
from coupon.logs import logging_config

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send


def shield_receive(app: ASGIApp) -> ASGIApp:
    """Keep pyvoy's receive() futures from being cancelled under it (gRPC and gRPC-Web calls).

    connectrpc watches receive() for a disconnect while a streaming-protocol call (gRPC,
    gRPC-Web) runs and cancels that watch when the call ends. pyvoy 1.3.0 then sets the result
    of the future it handed out anyway and the loop logs an InvalidStateError traceback for
    every call. Awaiting pyvoy's future through a shield cancels only our wait; pyvoy's own
    future stays pending until pyvoy settles it.
    """

    async def shielded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_grpc(scope):
            await app(scope, receive, send)
            return
        pending: asyncio.Future[Message] | None = None

        async def receive_shielded() -> Message:
            nonlocal pending
            if pending is None:
                pending = asyncio.ensure_future(receive())
            message = await asyncio.shield(pending)
            pending = None
            return message

        await app(scope, receive_shielded, send)

    return shielded


def _is_grpc(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return bool(value.startswith(b"application/grpc"))
    return False


_config = load_config(os.environ.get(CONFIG_PATH_ENV) or None)
logging.config.dictConfig(logging_config(_config.server.log_format, _config.server.log_level))
app = shield_receive(create_app(_config))
