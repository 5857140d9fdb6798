"""Opaque page tokens for keyset pagination over a campaign's codes in issue order.

A token names the campaign and the sequence number of the last code already returned, so
the next page starts right after it whatever is issued meanwhile, and a token cannot be
replayed against another campaign.
"""

from __future__ import annotations

import base64
import binascii

from coupon.errors import InvalidArgument

_PREFIX = "v1"


def encode_page_token(campaign_id: str, last_seq: int) -> str:
    raw = f"{_PREFIX}:{campaign_id}:{last_seq}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, campaign_id: str) -> int:
    """Return the sequence number to continue after; 0 for an empty token (the first page)."""
    if not token:
        return 0
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        prefix, token_campaign, seq_text = raw.split(":")
        last_seq = int(seq_text)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("page_token is not valid") from None
    if prefix != _PREFIX or token_campaign != campaign_id or last_seq < 1:
        raise InvalidArgument("page_token is not valid for this campaign")
    return last_seq
