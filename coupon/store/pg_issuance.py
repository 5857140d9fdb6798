"""One transaction that serves a group of IssueCoupon calls of one campaign (PostgreSQL).

Every call in the group is a claimant, except that repeated calls of one user share a claim.
The transaction:
1. takes positions with one conditional increment (take_many) for every claimant;
2. under the row lock that increment holds, looks up which of the group's users already hold
   a code; they get it back, and the positions they did not need are given back;
3. inserts one fresh code per remaining claimant, first come first served, in one statement
   (collisions retried with fresh codes); claimants beyond what was granted are sold out;
4. commits. Only then are the results handed to the callers.
When take_many matches nothing, one query tells why (not found / not started / sold out);
a user who holds a code still gets it back from a sold-out campaign.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from coupon.campaigns import IssuedCoupon
from coupon.codes import new_code
from coupon.errors import CampaignNotFound, CampaignNotStarted, CouponError, SoldOut

if TYPE_CHECKING:
    import uuid
    from collections.abc import Mapping, Sequence
    from datetime import datetime

    from psycopg import AsyncConnection

    from coupon.store.pg_commit import GroupTrace

# A collision needs two equal 134-bit codes; more than a few rounds means a bug, not bad luck.
MAX_CODE_ROUNDS = 8


@dataclass(frozen=True, slots=True)
class CampaignFacts:
    """What never changes about a campaign, so a process may cache it."""

    total: int
    start_time: datetime


@dataclass(slots=True)
class GroupOutcome:
    results: list[IssuedCoupon | CouponError]
    facts: CampaignFacts | None = None
    sold_out: bool = False  # the campaign has no coupon left (permanent)


@dataclass(slots=True)
class _Claim:
    """One claim on a position: an anonymous call, or every call of one user."""

    user_id: str | None
    calls: list[int] = field(default_factory=list)  # indexes into the group


async def issue_group(
    conn: AsyncConnection[Any],
    sql: Mapping[str, str],
    campaign_id: uuid.UUID,
    user_ids: Sequence[str | None],
    trace: GroupTrace | None = None,
) -> GroupOutcome:
    claims = _claims(user_ids)
    users = [c.user_id for c in claims if c.user_id is not None]
    results: list[IssuedCoupon | CouponError | None] = [None] * len(user_ids)
    async with conn.transaction():
        cursor = await conn.execute(
            sql["take_many"], {"campaign_id": campaign_id, "wanted": len(claims)}
        )
        taken = await cursor.fetchone()
        if taken is None:
            return await _explain_refusal(
                conn, sql, campaign_id, claims=claims, users=users, results=results
            )
        before, after, total, start_time, now, xid = taken
        if trace is not None:
            trace.xid, trace.db_now = xid, now
        outcome = GroupOutcome(results=[], facts=CampaignFacts(total, start_time))

        held = await _held_codes(conn, sql, campaign_id, users) if users else {}
        needing = []
        for claim in claims:
            if claim.user_id is not None and claim.user_id in held:
                _settle(results, claim, held[claim.user_id], repeat=True)
            else:
                needing.append(claim)
        granted = after - before
        winners, losers = needing[:granted], needing[granted:]
        unused = granted - len(winners)
        if unused:
            await conn.execute(sql["give_back"], {"campaign_id": campaign_id, "unused": unused})
        codes = await _insert_codes(conn, sql, campaign_id, before=before, winners=winners, now=now)
        for claim, code in zip(winners, codes, strict=True):
            _settle(results, claim, IssuedCoupon(code=code, issued_at=now), repeat=False)
        for claim in losers:
            _fail(results, claim, SoldOut())
        outcome.sold_out = after - unused >= total
        outcome.results = _complete(results)
        if trace is not None:
            trace.pending = outcome  # from here on, COMMIT decides
    return outcome


def _claims(user_ids: Sequence[str | None]) -> list[_Claim]:
    claims: list[_Claim] = []
    by_user: dict[str, _Claim] = {}
    for index, user_id in enumerate(user_ids):
        if user_id is None:
            claims.append(_Claim(None, [index]))
        elif user_id in by_user:
            by_user[user_id].calls.append(index)
        else:
            claim = by_user[user_id] = _Claim(user_id, [index])
            claims.append(claim)
    return claims


async def _held_codes(
    conn: AsyncConnection[Any], sql: Mapping[str, str], campaign_id: uuid.UUID, users: list[str]
) -> dict[str, IssuedCoupon]:
    cursor = await conn.execute(sql["held_codes"], {"campaign_id": campaign_id, "user_ids": users})
    return {
        user_id: IssuedCoupon(code=code, issued_at=issued_at)
        for user_id, code, issued_at in await cursor.fetchall()
    }


async def _insert_codes(
    conn: AsyncConnection[Any],
    sql: Mapping[str, str],
    campaign_id: uuid.UUID,
    *,
    before: int,
    winners: list[_Claim],
    now: datetime,
) -> list[str]:
    """Store one fresh code per winner at positions before+1.. and return them in order."""
    codes = {before + 1 + i: "" for i in range(len(winners))}
    user_by_seq = {before + 1 + i: claim.user_id for i, claim in enumerate(winners)}
    pending = list(codes)
    for _ in range(MAX_CODE_ROUNDS):
        if not pending:
            break
        draws = {seq: new_code() for seq in pending}
        cursor = await conn.execute(
            sql["insert_coupons"],
            {
                "campaign_id": campaign_id,
                "issued_at": now,
                "codes": list(draws.values()),
                "seqs": list(draws),
                "user_ids": [user_by_seq[seq] for seq in draws],
            },
        )
        stored = {row[0] for row in await cursor.fetchall()}
        for seq in stored:
            codes[seq] = draws[seq]
        pending = [seq for seq in pending if seq not in stored]
    if pending:
        raise RuntimeError(f"no unique code after {MAX_CODE_ROUNDS} rounds")
    return list(codes.values())


async def _explain_refusal(
    conn: AsyncConnection[Any],
    sql: Mapping[str, str],
    campaign_id: uuid.UUID,
    *,
    claims: list[_Claim],
    users: list[str],
    results: list[IssuedCoupon | CouponError | None],
) -> GroupOutcome:
    cursor = await conn.execute(sql["campaign_state"], {"campaign_id": campaign_id})
    row = await cursor.fetchone()
    if row is None:
        return GroupOutcome(results=[CampaignNotFound() for _ in results])
    total, start_time, started = row
    facts = CampaignFacts(total, start_time)
    if not started:
        return GroupOutcome([CampaignNotStarted(start_time) for _ in results], facts)
    # Started and take_many found no position: sold out. Holders still get their codes.
    held = await _held_codes(conn, sql, campaign_id, users) if users else {}
    for claim in claims:
        if claim.user_id is not None and claim.user_id in held:
            _settle(results, claim, held[claim.user_id], repeat=True)
        else:
            _fail(results, claim, SoldOut())
    return GroupOutcome(_complete(results), facts, sold_out=True)


def _settle(
    results: list[IssuedCoupon | CouponError | None],
    claim: _Claim,
    coupon: IssuedCoupon,
    *,
    repeat: bool,
) -> None:
    for n, index in enumerate(claim.calls):
        # A user's second call in the same group is a repeat of the first.
        results[index] = IssuedCoupon(coupon.code, coupon.issued_at, repeat=repeat or n > 0)


def _fail(
    results: list[IssuedCoupon | CouponError | None], claim: _Claim, error: CouponError
) -> None:
    for index in claim.calls:
        results[index] = error


def _complete(results: list[IssuedCoupon | CouponError | None]) -> list[IssuedCoupon | CouponError]:
    done = [r for r in results if r is not None]
    if len(done) != len(results):
        raise RuntimeError("a call of the group got no outcome")
    return done
