"""The one place where domain errors become Connect errors.

A refusal with a reason carries it as a google.rpc.ErrorInfo detail (domain "coupon"), which
Connect and gRPC clients decode from the error; the message stays for people.

Anything else that escapes a handler is a bug: its traceback goes to the server log and the
client gets a generic `internal` error, so no driver message, SQL or DSN ever leaves the process.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from connectrpc._protocol import ConnectWireError
from connectrpc.code import Code
from connectrpc.errors import ConnectError, ErrorDetail

from coupon import errors
from coupon.gen.google.rpc.error_details_pb import ErrorInfo
from coupon.store.cache import BoundedCache

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from connectrpc.request import RequestContext

log = logging.getLogger("coupon.rpc")

REQ = TypeVar("REQ")
RES = TypeVar("RES")

ERROR_DOMAIN = "coupon"

CONNECT_CODE_BY_ERROR: dict[type[errors.CouponError], Code] = {
    errors.InvalidArgument: Code.INVALID_ARGUMENT,
    errors.CampaignNotFound: Code.NOT_FOUND,
    errors.CouponNotFound: Code.NOT_FOUND,
    errors.CampaignNotStarted: Code.FAILED_PRECONDITION,
    errors.CampaignEnded: Code.FAILED_PRECONDITION,
    errors.CouponExpired: Code.FAILED_PRECONDITION,
    errors.AlreadyRedeemed: Code.FAILED_PRECONDITION,
    errors.NotHolder: Code.FAILED_PRECONDITION,
    errors.UserMismatch: Code.FAILED_PRECONDITION,
    errors.IdempotencyKeyReused: Code.FAILED_PRECONDITION,
    errors.SoldOut: Code.RESOURCE_EXHAUSTED,
    errors.StoreUnavailable: Code.UNAVAILABLE,
    errors.CommitUnknown: Code.UNKNOWN,
    errors.Unauthenticated: Code.UNAUTHENTICATED,
    errors.PermissionDenied: Code.PERMISSION_DENIED,
}


def to_connect_error(error: errors.CouponError) -> ConnectError:
    for error_type in type(error).__mro__:
        code = CONNECT_CODE_BY_ERROR.get(error_type)
        if code is not None:
            if error.reason is None:
                return ConnectError(code, error.message)
            return ConnectError(code, error.message, details=[_error_info(error.reason)])
    return ConnectError(Code.INTERNAL, "internal error")


@dataclass(frozen=True, slots=True)
class RefusalAnswer:
    error: ConnectError  # for the metrics; never raised
    status: int
    body: bytes


def refusal_answer(error: errors.CouponError) -> RefusalAnswer:
    """The HTTP status and body the Connect runtime answers `error` with, for
    coupon.early_refusals, which answers without it."""
    key = (type(error), error.message)
    answer = _refusal_answers.get(key)
    if answer is None:
        connect_error = to_connect_error(error)
        # connectrpc's own encoder (it has no public one), so these are its bytes exactly;
        # tests/test_early_refusals.py compares them with its answers. Version pinned.
        wire = ConnectWireError.from_exception(connect_error)
        answer = RefusalAnswer(connect_error, wire.to_http_status().code, wire.to_json_bytes())
        _refusal_answers.put(key, answer)
    return answer


# By message too, as a not-started refusal names its campaign's start instant; bounded, as
# campaigns come and go.
_MAX_REFUSAL_ANSWERS = 1024
_refusal_answers: BoundedCache[tuple[type[errors.CouponError], str], RefusalAnswer] = BoundedCache(
    _MAX_REFUSAL_ANSWERS
)


@functools.cache
def _error_info(reason: str) -> ErrorDetail:
    """The packed detail of a reason, built once: a sold-out storm answers it thousands of
    times a second, and reasons are a fixed few."""
    return ErrorDetail(ErrorInfo(reason=reason, domain=ERROR_DOMAIN))


class ErrorInterceptor:
    """Turns domain errors into their Connect codes and bugs into a generic `internal`."""

    async def intercept_unary(
        self,
        call_next: Callable[[REQ, RequestContext[Any, Any]], Awaitable[RES]],
        request: REQ,
        ctx: RequestContext[Any, Any],
        /,
    ) -> RES:
        try:
            return await call_next(request, ctx)
        except ConnectError:
            raise
        except errors.CouponError as e:
            raise to_connect_error(e) from None
        except Exception:
            log.exception("unexpected error in %s", ctx.method.name)
            raise ConnectError(Code.INTERNAL, "internal error") from None
