"""Campaigns whose IssueCoupon calls were refused a moment ago (sold out, not started, ended):
the calls that coupon.early_refusals looks at closely. Every other call goes straight to the
Connect runtime, so a server with no refusing campaign pays nothing for early refusals.

An entry lasts TTL_S after the last refusal that noted it: the service notes each refusal of
the full path, the early path each refusal of its own. A campaign that stops refusing (its start
came) stops being looked at within TTL_S, and one that goes on refusing stays. The set is
bounded, as the ids in it come from callers.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

TTL_S = 1.0
MAX_CAMPAIGNS = 4096


class RefusingCampaigns:
    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        # Campaign id -> when its entry lapses. Public for one reason: the dispatcher tests
        # it for emptiness on every IssueCoupon call, at the cost of a dictionary's truth.
        self.entries: dict[str, float] = {}
        self._next_sweep = 0.0

    def note(self, campaign_id: str) -> None:
        if len(self.entries) >= MAX_CAMPAIGNS and campaign_id not in self.entries:
            self.entries.clear()  # the busy ones are noted again by their next refusal
        self.entries[campaign_id] = self._monotonic() + TTL_S

    def is_refusing(self, campaign_id: str) -> bool:
        now = self._monotonic()
        if now >= self._next_sweep:
            # Lapsed entries go within TTL_S of lapsing, looked up or not: once the last
            # storm is over the set empties, and IssueCoupon calls skip the early path.
            self._next_sweep = now + TTL_S
            for lapsed in [key for key, until in self.entries.items() if until <= now]:
                del self.entries[lapsed]
        until = self.entries.get(campaign_id)
        return until is not None and until > now
