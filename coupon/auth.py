"""Admin token check for the calls that create campaigns and read issued codes (a code list is
money). IssueCoupon stays open: it is what the public races for."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from coupon.errors import PermissionDenied, Unauthenticated
from coupon.rpc_errors import to_connect_error

if TYPE_CHECKING:
    from connectrpc.request import RequestContext

ADMIN_METHODS = frozenset({"CreateCampaign", "GetCampaign"})


class AdminAuthInterceptor:
    """A Connect metadata interceptor: refuses before the request body is even read."""

    def __init__(self, admin_token: str) -> None:
        self._expected = f"Bearer {admin_token}".encode()

    async def on_start(self, ctx: RequestContext[Any, Any]) -> None:
        if ctx.method.name not in ADMIN_METHODS:
            return
        given = ctx.request_headers.get("authorization")
        if not given:
            raise to_connect_error(Unauthenticated())
        # Constant-time: the comparison must not reveal how much of a guess was right.
        if not hmac.compare_digest(given.encode(), self._expected):
            raise to_connect_error(PermissionDenied())

    async def on_end(
        self, token: None, ctx: RequestContext[Any, Any], error: Exception | None
    ) -> None:
        return None
