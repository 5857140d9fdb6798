"""The events a brand's systems receive, as plain values (no HTTP, no SQL)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

ISSUED = "coupon.issued"
REDEEMED = "coupon.redeemed"
REDEMPTION_CANCELLED = "coupon.redemption_cancelled"

# uuid5's namespace for event ids. Fixed for good: changing it would change the id of every
# event not yet delivered.
EVENT_ID_NAMESPACE = uuid.UUID("49c221f1-17ec-455b-866b-267e444cb611")


@dataclass(frozen=True, slots=True)
class Event:
    id: str  # unique: a receiver deduplicates on it (delivery is at least once)
    type: str
    time: datetime
    campaign_id: str
    brand: str
    code: str
    user_id: str = ""
    order_id: str = ""

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Event:
        """An event as the outbox of earlier builds kept it (every field, in JSON)."""
        return cls(**{**payload, "time": datetime.fromisoformat(payload["time"])})


def event_id(event_type: str, change: str) -> str:
    """uuid5 of `<type>/<change>`: the same id every time for the same change (a code's issue:
    its code, which is unique; a redemption or cancellation: its history row's id), so a
    retried batch repeats its ids."""
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{event_type}/{change}"))


def new_event(
    event_type: str,
    *,
    time: datetime,
    campaign_id: str,
    brand: str,
    code: str,
    user_id: str | None = None,
    order_id: str | None = None,
) -> Event:
    return Event(
        id=str(uuid.uuid4()),
        type=event_type,
        time=time,
        campaign_id=campaign_id,
        brand=brand,
        code=code,
        user_id=user_id or "",
        order_id=order_id or "",
    )
