"""Opaque page tokens for keyset pagination.

A GetCampaign token names the campaign and the sequence number of the last code already
returned, so the next page starts right after it whatever is issued meanwhile, and a token
cannot be replayed against another campaign. A ListCampaigns token names the creation instant
and id of the last campaign listed (newest first).
"""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import timedelta

from coupon.campaigns import ListCursor
from coupon.clock import EPOCH, microseconds_since_epoch
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


_LIST_PREFIX = "c1"


def encode_list_token(cursor: ListCursor) -> str:
    micros = microseconds_since_epoch(cursor.created_at)
    raw = f"{_LIST_PREFIX}:{micros}:{cursor.campaign_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_list_token(token: str) -> ListCursor | None:
    """Return where the previous page of ListCampaigns ended; None for the first page."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        prefix, micros_text, campaign_id = raw.split(":")
        created_at = EPOCH + timedelta(microseconds=int(micros_text))
        campaign_id = str(uuid.UUID(campaign_id))
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError):
        raise InvalidArgument("page_token is not valid") from None
    if prefix != _LIST_PREFIX:
        raise InvalidArgument("page_token is not valid")
    return ListCursor(created_at=created_at, campaign_id=campaign_id)
