"""Who may call what: named API keys with a role and a brand, and customers' JWTs.

One metadata interceptor resolves the caller from `Authorization: Bearer <token>` before the
request body is read, records it for the service (coupon.caller), and refuses a call the
caller's role does not allow. Methods are protected by default: only PUBLIC_METHODS are open,
every other method needs one of the roles METHOD_ROLES gives it, and a method missing from
that table (one added to the proto later) needs an admin.

Keys are configured as SHA-256 digests and looked up by the digest of the presented token. A
dictionary lookup compares digests, not tokens, so any timing difference it has tells an
attacker how many leading bytes of SHA-256(guess) match a stored digest: steering that needs
SHA-256 preimages, so it reveals nothing usable about a token, and the lookup stays O(1)
however many keys a marketplace configures (hmac.compare_digest over every digest would be
constant-time too, but linear in the number of keys for every call).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
from typing import TYPE_CHECKING, Any

from coupon.caller import OPEN_ACCESS, Caller, set_caller
from coupon.config import SHORTHAND_KEY_NAME
from coupon.customers import CustomerTokens
from coupon.errors import PermissionDenied, Unauthenticated
from coupon.rpc_errors import to_connect_error

if TYPE_CHECKING:
    from collections.abc import Mapping

    from connectrpc.request import RequestContext

    from coupon.config import AuthConfig

ADMIN = "admin"
CHECKOUT = "checkout"

# The customers' call: open, or with auth.customers.jwt set, for verified customers only.
PUBLIC_METHODS = frozenset({"IssueCoupon"})
# Every other method and the roles that may call it; tests/test_auth.py checks that every
# method of the service descriptor is in exactly one of the two tables.
METHOD_ROLES: Mapping[str, frozenset[str]] = {
    "CreateCampaign": frozenset({ADMIN}),
    "GetCampaign": frozenset({ADMIN}),
    "ListCampaigns": frozenset({ADMIN}),
    "GetCoupon": frozenset({ADMIN, CHECKOUT}),
    "RedeemCoupon": frozenset({ADMIN, CHECKOUT}),
    "CancelRedemption": frozenset({ADMIN, CHECKOUT}),
}
_ADMIN_ONLY = frozenset({ADMIN})

# Names callers go by in logs and metrics when no key names them.
ANONYMOUS = Caller(name="anonymous", role=None, brand=None)
UNIDENTIFIED = Caller(name="unidentified", role=None, brand=None)
CUSTOMER_NAME = "customer"  # never the user id: metrics labels must stay few


def roles_for(method: str) -> frozenset[str]:
    """The roles that may call `method`; a method nobody classified is for admins only."""
    return METHOD_ROLES.get(method, _ADMIN_ONLY)


class Authenticator:
    """Turns the Authorization header of a call into a Caller, or refuses the call."""

    def __init__(self, config: AuthConfig, environ: Mapping[str, str] | None = None) -> None:
        self._open = not config.has_api_keys
        self._keys: dict[bytes, Caller] = {
            bytes.fromhex(key.sha256): Caller(name=key.name, role=key.role, brand=key.brand)
            for key in config.tokens
        }
        if config.admin_token:
            digest = hashlib.sha256(config.admin_token.encode()).digest()
            self._keys[digest] = Caller(name=SHORTHAND_KEY_NAME, role=ADMIN, brand=None)
        self._customers = (
            CustomerTokens(config.customers_jwt, os.environ if environ is None else environ)
            if config.customers_jwt is not None
            else None
        )
        # The methods caller_for answers without a credential, and who calls them then. It
        # decides those before it looks at one, so identify() need not read the headers for
        # them: IssueCoupon (every call of a storm) on a server without customer JWTs, and
        # every method on an open server.
        self.caller_without_credential: dict[str, Caller] = {}
        for method in PUBLIC_METHODS | METHOD_ROLES.keys():
            with contextlib.suppress(Unauthenticated):
                self.caller_without_credential[method] = self.caller_for(method, None)

    def caller_for(self, method: str, authorization: str | None) -> Caller:
        """Who calls `method`; raises Unauthenticated / PermissionDenied to refuse the call."""
        if method in PUBLIC_METHODS:
            if self._customers is None:
                return ANONYMOUS
            token = _bearer(authorization)
            if token is None:
                raise Unauthenticated(
                    f"{method} needs a customer token: Authorization: Bearer <JWT>"
                )
            user_id = self._customers.user_id(token)
            return Caller(name=CUSTOMER_NAME, role=None, brand=None, user_id=user_id)
        if self._open:
            return OPEN_ACCESS
        token = _bearer(authorization)
        if token is None:
            raise Unauthenticated()
        caller = self._keys.get(hashlib.sha256(token.encode()).digest())
        if caller is None:
            raise Unauthenticated("the credential is not a known key")
        if caller.role not in roles_for(method):
            set_caller(caller)  # so the refusal is logged and counted under the key's name
            raise PermissionDenied(f"the key {caller.name!r} ({caller.role}) may not call {method}")
        return caller


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def identify(authenticator: Authenticator, ctx: RequestContext[Any, Any]) -> None:
    """Record who makes this call (coupon.caller), before its body is even read; raises the
    Connect error that refuses it."""
    method = ctx.method.name
    known = authenticator.caller_without_credential.get(method)
    if known is not None:
        set_caller(known)
        return
    headers = ctx.request_headers
    # `in` first: a missing key costs connectrpc's Headers.get an exception (hot path).
    authorization = headers["authorization"] if "authorization" in headers else None  # noqa: SIM401
    try:
        caller = authenticator.caller_for(method, authorization)
    except Unauthenticated as e:
        set_caller(UNIDENTIFIED)
        raise to_connect_error(e) from None
    except PermissionDenied as e:  # a known key, refused this method: recorded by caller_for
        raise to_connect_error(e) from None
    set_caller(caller)


def is_loopback(host: str) -> bool:
    """Whether `host` (a server.host value) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def open_admin_refusal(host: str, config: AuthConfig) -> str | None:
    """Why the server must not start (fail closed), or None when it may."""
    if config.has_api_keys or config.allow_open_admin or is_loopback(host):
        return None
    return (
        f"server.host is {host}, reachable from other machines, and no API key is configured, "
        "so anyone could create campaigns and read their codes. Set an admin key: "
        "COUPON_AUTH_ADMIN_TOKEN=<token>, or auth.tokens with the SHA-256 of a token "
        "(see the README's Auth section); or set auth.allow_open_admin: true if this is "
        "really meant to be open"
    )
