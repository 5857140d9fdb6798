"""The events a brand's systems receive, as plain values (no HTTP, no SQL)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

ISSUED = "coupon.issued"
REDEEMED = "coupon.redeemed"
REDEMPTION_CANCELLED = "coupon.redemption_cancelled"


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

    def to_payload(self) -> dict[str, Any]:
        """A JSON-ready dict, as kept in the outbox until delivery."""
        # Spelled out rather than dataclasses.asdict (which deep-copies): this runs inside the
        # issuing transaction, for up to a whole group of codes.
        return {
            "id": self.id,
            "type": self.type,
            "time": self.time.isoformat(),
            "campaign_id": self.campaign_id,
            "brand": self.brand,
            "code": self.code,
            "user_id": self.user_id,
            "order_id": self.order_id,
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Event:
        return cls(**{**payload, "time": datetime.fromisoformat(payload["time"])})


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
