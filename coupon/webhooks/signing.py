"""The Coupon-Signature header: HMAC-SHA256 over `<unix time>.<body>` (Stripe's scheme)."""

from __future__ import annotations

import hashlib
import hmac

HEADER = "Coupon-Signature"


def signature_header(secret: str, body: bytes, unix_time: int) -> str:
    return f"t={unix_time},v1={_digest(secret, body, unix_time)}"


def verify(secret: str, body: bytes, header: str, *, now: int, tolerance_s: int = 300) -> bool:
    """Whether the header signs this body with this secret, within `tolerance_s` of now."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        unix_time = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - unix_time) > tolerance_s:
        return False
    return hmac.compare_digest(fields.get("v1", ""), _digest(secret, body, unix_time))


def _digest(secret: str, body: bytes, unix_time: int) -> str:
    signed = str(unix_time).encode() + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
