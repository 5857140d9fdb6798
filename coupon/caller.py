"""Who is calling: set once per call by the auth interceptor, read by the service.

A context variable rather than an argument because the Connect runtime owns the handler
signature; the interceptor runs in the same task as the handler, so the value it sets is the
one the handler sees, and concurrent calls never see each other's.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Caller:
    name: str  # the credential's name, for logs and metrics (never the token)
    role: str | None  # "admin", "checkout", or None for a customer / anonymous caller
    brand: str | None  # the only brand this caller may see; None: every brand
    user_id: str | None = None  # a customer's verified identity (JWT `sub`)


# A server with no credentials configured at all (local development) is open: every caller
# acts as an all-brands admin. The auth interceptor replaces this for every call otherwise.
OPEN_ACCESS = Caller(name="open", role="admin", brand=None)

# No default on the variable itself, so log lines written outside any call can tell.
_current: ContextVar[Caller] = ContextVar("coupon_caller")


def current_caller() -> Caller:
    return _current.get(OPEN_ACCESS)


def set_caller(caller: Caller) -> None:
    _current.set(caller)


class CallerFilter(logging.Filter):
    """Adds `caller` (the key's name, never the token) to every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        caller = _current.get(None)
        record.caller = "-" if caller is None else caller.name
        return True
