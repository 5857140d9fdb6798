"""A request id per call: taken from `X-Request-Id` when the caller sends a sane one, else made
up; echoed in the response and stamped on every log line written while the call runs."""

from __future__ import annotations

import contextvars
import itertools
import logging
import re
import secrets
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from connectrpc.request import RequestContext

HEADER = "x-request-id"
_SANE = re.compile(r"[A-Za-z0-9._:-]{1,64}")

# Made-up ids are a random per-process prefix and a counter: unique across processes and
# restarts in practice, and free of the system call a random id per call would cost.
_PROCESS_PREFIX = secrets.token_hex(5)
_counter = itertools.count(1)

current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def begin(ctx: RequestContext[Any, Any]) -> contextvars.Token[str]:
    """Give the call its id, before its body is read (coupon.call_interceptor), so every call
    has one; `end` with the returned token when the call ends."""
    headers = ctx.request_headers
    # `in` first: a missing key costs connectrpc's Headers.get an exception (hot path).
    request_id = choose(headers[HEADER] if HEADER in headers else None)  # noqa: SIM401
    ctx.response_headers[HEADER] = request_id
    return current_request_id.set(request_id)


def choose(given: str | None) -> str:
    """The call's id: the caller's `X-Request-Id` (`given`) when it is sane, else a new one."""
    if given is not None and _SANE.fullmatch(given):
        return given
    return f"{_PROCESS_PREFIX}{next(_counter):06x}"


def end(token: contextvars.Token[str]) -> None:
    current_request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record ('-' outside a call)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get()
        return True
