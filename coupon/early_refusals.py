"""IssueCoupon refusals the store knows for certain, answered in front of the Connect runtime.

A first-come-first-served campaign draws its storm after its last coupon: every further call
is refused as sold out, thousands a second. Through the Connect runtime a refusal costs more
than an issued coupon, since the error is raised through its handler and its JSON built anew
for every call. When the store can tell without I/O that a call will be refused
(Store.refusal_without_io), this app answers it itself: the same status and bytes the runtime
sends (coupon.rpc_errors encodes them with the runtime's own encoder, once per distinct
refusal), the same request id, and the same metrics.

It looks only at calls naming a campaign refused a moment ago (coupon.refusing_campaigns), so
while no campaign refuses, IssueCoupon calls go straight to the runtime. It answers only what
it can answer exactly as the runtime would: a POST of IssueCoupon in the Connect protocol,
JSON or binary, uncompressed, within the body limit, whose credential, request and campaign
pass the checks the service makes. Anything else (gRPC, a compressed or malformed body, a bad
credential, a call the store would serve or cannot judge without a query) goes to the Connect
app as it came, its body replayed, and is answered there. tests/test_early_refusals.py sends
each kind both ways and compares the answers byte for byte.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Any

from coupon import metrics, request_ids
from coupon.caller import set_caller
from coupon.gen.coupon_pb import IssueCouponRequest
from coupon.rpc_errors import refusal_answer
from coupon.service import count_issue_refusal, issue_request_of

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from connectrpc.codec import Codec
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from coupon.auth import Authenticator
    from coupon.errors import CouponError
    from coupon.refusing_campaigns import RefusingCampaigns
    from coupon.store import Store

METHOD = "IssueCoupon"


class EarlyRefusals:
    """The ASGI app for IssueCoupon's path: refuses what the store knows it would refuse,
    hands everything else to `connect_app`."""

    def __init__(
        self,
        connect_app: ASGIApp,
        *,
        store: Store,
        authenticator: Authenticator,
        codecs: Mapping[bytes, Codec[Any, Any]],
        max_request_bytes: int,
        refusing: RefusingCampaigns,
    ) -> None:
        self._connect_app = connect_app
        self._store = store
        self._authenticator = authenticator
        self._codecs = codecs  # by Content-Type, the codecs the Connect app was given
        self._max_request_bytes = max_request_bytes
        self._refusing = refusing  # noted by the service's refusals and by ours

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # While a campaign refuses, the calls to be served pay for a dictionary of the
        # headers, the body's first message handed on, and a search of the body.
        started = time.perf_counter()
        headers = dict(scope["headers"])
        codec = self._codecs.get(headers.get(b"content-type", b""))
        if (
            codec is None
            or scope["method"] != "POST"
            or len(headers) != len(scope["headers"])  # a header sent twice: the runtime's
            or not (_CHECKED.keys().isdisjoint(headers) or _unchanged_answer(headers))
        ):
            await self._connect_app(scope, receive, send)
            return
        # The runtime's deadline runs from the call's start, body read included: so does
        # ours, and a call handed on gets what is left of it.
        timeout_ms = headers.get(_TIMEOUT_HEADER)
        received: list[Message] = []
        deadline = None
        if not timeout_ms:
            body = await _read_body(received, receive, self._max_request_bytes)
        else:
            deadline = asyncio.get_running_loop().time() + int(timeout_ms) / 1000
            try:
                async with asyncio.timeout_at(deadline):
                    body = await _read_body(received, receive, self._max_request_bytes)
            except TimeoutError:
                body = None  # the runtime answers deadline_exceeded, on what is left: nothing
        refusal = None
        if body is not None and self._names_refusing_campaign(body):
            refusal = self._refusal(body, codec, headers)
        if refusal is None:
            if deadline is not None:
                scope = _with_time_left(scope, deadline)
            await self._connect_app(scope, _Replaying(received, receive), send)
            return
        count_issue_refusal(refusal)
        answer = refusal_answer(refusal)
        given_id = headers.get(_REQUEST_ID_HEADER)
        request_id = request_ids.choose(None if given_id is None else given_id.decode())
        metrics.record_call(METHOD, answer.error, started)  # as the runtime: before sending
        await send(
            {
                "type": "http.response.start",
                "status": answer.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (_REQUEST_ID_HEADER, request_id.encode()),
                ],
                "trailers": False,
            }
        )
        await send({"type": "http.response.body", "body": answer.body, "more_body": False})

    def _names_refusing_campaign(self, body: bytes) -> bool:
        """Whether the body holds the id of a refusing campaign, found by its shape rather
        than by decoding, so that the calls to be served are not decoded twice. An id spelt
        otherwise (upper case, escaped in JSON) goes the long way, to the same answer."""
        at = body.find(b"-", 8)
        while at != -1:
            # A canonical id's hyphens are 8, 13, 18 and 23 characters in.
            if body[at + 5 : at + 6] == b"-":
                if self._refusing.is_refusing(body[at - 8 : at + 28].decode("latin-1")):
                    return True
                at = body.find(b"-", at + 28)
            else:
                at = body.find(b"-", at + 1)
        return False

    def _refusal(
        self, body: bytes, codec: Codec[Any, Any], headers: dict[bytes, bytes]
    ) -> CouponError | None:
        """The store's certain refusal of this call; None when the Connect app must answer."""
        if not all(value.isascii() for value in headers.values()):
            return None  # the runtime decodes every header as UTF-8: its answer, not ours
        try:
            request = codec.decode(body, IssueCouponRequest)
            authorization = headers.get(b"authorization")
            caller = self._authenticator.caller_for(
                METHOD, None if authorization is None else authorization.decode()
            )
            campaign_id, issue = issue_request_of(request, caller)
            refusal = self._store.refusal_without_io(campaign_id, issue)
        except Exception:  # noqa: BLE001 - the runtime answers it, and logs a store's bug
            return None
        if refusal is not None:
            self._refusing.note(campaign_id)  # still refusing: keep looking at its calls
            set_caller(caller)  # the metrics' caller label, as the interceptor sets it
        return refusal


_REQUEST_ID_HEADER = request_ids.HEADER.encode()
_TIMEOUT_HEADER = b"connect-timeout-ms"
_TIMEOUT_MAX_DIGITS = 10  # the Connect protocol's limit, which the runtime enforces


def _positive_timeout(value: bytes) -> bool:
    if not value:
        return True  # an empty header sets no timeout
    return len(value) <= _TIMEOUT_MAX_DIGITS and value.isdigit() and int(value) > 0


# Headers that change the runtime's answer, with the values that leave it unchanged.
_CHECKED: dict[bytes, Callable[[bytes], bool]] = {
    b"content-encoding": lambda value: value == b"identity",
    b"connect-protocol-version": lambda value: value == b"1",
    _TIMEOUT_HEADER: _positive_timeout,
    # The runtime refuses a bad credential before asking for the body; waiting here for a
    # body the client sends only after `100 Continue` would ask for it first.
    b"expect": lambda _: False,
}


def _unchanged_answer(headers: dict[bytes, bytes]) -> bool:
    return all(check(headers[name]) for name, check in _CHECKED.items() if name in headers)


async def _read_body(received: list[Message], receive: Receive, limit: int) -> bytes | None:
    """The whole body, keeping every message read in `received`; None when the client left
    or the body is over `limit` (the runtime answers both)."""
    message = await receive()
    received.append(message)
    if message["type"] != "http.request":
        return None
    if not message.get("more_body", False):
        body: bytes = message.get("body", b"")  # the usual: one message
        return body if len(body) <= limit else None
    pieces = [message.get("body", b"")]
    size = len(pieces[0])
    while message.get("more_body", False):
        message = await receive()
        received.append(message)
        if message["type"] != "http.request":
            return None
        pieces.append(message.get("body", b""))
        size += len(pieces[-1])
        if size > limit:
            return None  # read no further: the runtime reads the rest, and refuses it
    return b"".join(pieces)


def _with_time_left(scope: Scope, deadline: float) -> Scope:
    """`scope` with its Connect timeout cut to what is left before `deadline`: at least
    1 ms, as a spent deadline must still read as a timeout, not as a malformed header."""
    left_ms = max(1, math.ceil((deadline - asyncio.get_running_loop().time()) * 1000))
    headers = [
        (name, str(left_ms).encode() if name == _TIMEOUT_HEADER else value)
        for name, value in scope["headers"]
    ]
    return {**scope, "headers": headers}


class _Replaying:
    """`receive` as if nothing had been read yet: the messages already read come first. Not
    a coroutine itself: once they are given, a call returns `receive()`'s own awaitable, so
    the runtime's long wait for a disconnect runs through no frame of ours."""

    __slots__ = ("_pending", "_receive")

    def __init__(self, received: list[Message], receive: Receive) -> None:
        self._pending = received[::-1]
        self._receive = receive

    def __call__(self) -> Awaitable[Message]:
        if self._pending:
            return _given(self._pending.pop())
        return self._receive()


async def _given(message: Message) -> Message:
    return message
