"""Each answer leaves in one socket write (coupon.http_writes), through the protocol the server
runs (coupon.http_limits), with every write recorded: a Connect call, an interim
`100 Continue` that must not wait for the body, pipelined requests, and an app that fails
after starting its answer."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from uvicorn.config import Config
from uvicorn.server import ServerState

from coupon.app import create_app
from coupon.config import load_config
from coupon.http_limits import limited_protocol
from tests.support import SERVICE

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

WAIT_S = 10  # hang guard, not a speed check


class RecordingTransport(asyncio.Transport):
    """What the protocol writes to its connection, one entry per write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.changed = asyncio.Event()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        self.changed.set()

    def close(self) -> None:
        self.closed = True
        self.changed.set()

    async def until(self, condition: Any) -> None:
        """Wait until `condition()` holds, checking after each write or close."""
        async with asyncio.timeout(WAIT_S):
            while not condition():
                self.changed.clear()
                await self.changed.wait()

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        addresses = {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8080)}
        return addresses.get(name, default)


async def connection(app: ASGIApp) -> tuple[Any, RecordingTransport]:
    config = Config(app, log_config=None)
    config.load()
    protocol = limited_protocol(header_timeout_s=5, body_timeout_s=5)(
        config, ServerState(), {}, asyncio.get_running_loop()
    )
    transport = RecordingTransport()
    protocol.connection_made(transport)
    return protocol, transport


def post(path: str, body: bytes, *extra_headers: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: test", "Content-Type: application/json"]
    head += [f"Content-Length: {len(body)}", *extra_headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def answer_body(write: bytes) -> dict[str, Any]:
    """The JSON of a whole answer (connectrpc sends no Content-Length: uvicorn chunks it)."""
    head, _, rest = write.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert b"\r\ntransfer-encoding: chunked" in head, head
    body = b""
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert rest == b"\r\n", rest  # the last chunk ends the answer: nothing follows
            return json.loads(body)  # type: ignore[no-any-return]
        body, rest = body + rest[:size], rest[size + 2 :]


async def test_a_connect_answer_is_one_write_with_its_head_and_body() -> None:
    protocol, transport = await connection(create_app(load_config(None)))
    created = post(f"{SERVICE}/CreateCampaign", b'{"name": "one write", "total": 5}')
    protocol.data_received(created)
    await transport.until(lambda: len(transport.writes) == 1)
    campaign_id = answer_body(transport.writes[0])["campaignId"]

    issue = json.dumps({"campaignId": campaign_id}).encode()
    protocol.data_received(post(f"{SERVICE}/IssueCoupon", issue))
    await transport.until(lambda: len(transport.writes) == 2)
    assert len(answer_body(transport.writes[1])["code"]) == 10
    assert not transport.closed


async def test_pipelined_requests_get_one_write_each_in_order() -> None:
    protocol, transport = await connection(create_app(load_config(None)))
    names = [f"pipelined {i}" for i in range(3)]
    protocol.data_received(
        b"".join(
            post(f"{SERVICE}/CreateCampaign", json.dumps({"name": n, "total": 1}).encode())
            for n in names
        )
    )
    await transport.until(lambda: len(transport.writes) == 3)
    ids = [answer_body(write)["campaignId"] for write in transport.writes]
    assert len(set(ids)) == 3


async def test_100_continue_is_written_before_the_body_arrives() -> None:
    protocol, transport = await connection(create_app(load_config(None)))
    request = post(f"{SERVICE}/CreateCampaign", b'{"name": "expect", "total": 1}')
    head, _, body = request.partition(b"\r\n\r\n")
    protocol.data_received(head + b"\r\nExpect: 100-continue\r\n\r\n")
    # The client sends nothing more until it reads this, so it must not be held back.
    await transport.until(lambda: len(transport.writes) == 1)
    assert transport.writes[0] == b"HTTP/1.1 100 Continue\r\n\r\n"
    protocol.data_received(body)
    await transport.until(lambda: len(transport.writes) == 2)
    assert answer_body(transport.writes[1])["campaignId"]


async def test_an_app_failing_after_its_head_still_sends_the_head_then_closes() -> None:
    async def fails_after_head(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("failed after starting the answer")

    protocol, transport = await connection(fails_after_head)
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
    await transport.until(lambda: transport.closed)
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b"\r\n\r\n")  # the head alone, as uvicorn sent it
