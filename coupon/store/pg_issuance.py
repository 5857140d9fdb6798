"""One transaction that serves a group of IssueCoupon calls of one campaign (PostgreSQL).

Every call in the group is a claimant, except that calls of one user, or with one idempotency
key, share a claim. The transaction:
1. takes positions with one conditional increment (take_many) for every possible claimant;
2. under the row lock that increment holds, looks up the codes the group's users and keys
   already hold; those callers get them back (a key held with another user is refused), and
   the positions nobody needed are given back;
3. inserts one fresh code per remaining claimant, first come first served, in one statement
   (collisions retried with fresh codes); claimants beyond what was granted are sold out;
4. commits. Only then are the results handed to the callers.
When take_many matches nothing, one query tells why (not found / not started / ended / sold
out); a caller who holds a code still gets it back from a sold-out or ended campaign.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from coupon.campaigns import IssuedCoupon
from coupon.codes import new_code
from coupon.errors import (
    CampaignEnded,
    CampaignNotFound,
    CampaignNotStarted,
    CouponError,
    IdempotencyKeyReused,
    SoldOut,
)
from coupon.store.pg_lifecycle import discount_of

if TYPE_CHECKING:
    import uuid
    from collections.abc import Mapping, Sequence
    from datetime import datetime

    from psycopg import AsyncConnection

    from coupon.campaigns import Discount, IssueRequest
    from coupon.store.pg_commit import GroupTrace

# A collision needs two equal 134-bit codes; more than a few rounds means a bug, not bad luck.
MAX_CODE_ROUNDS = 8


@dataclass(frozen=True, slots=True)
class CampaignFacts:
    """What never changes about a campaign, so a process may cache it."""

    total: int
    start_time: datetime
    end_time: datetime | None = None
    discount: Discount | None = None


@dataclass(slots=True)
class GroupOutcome:
    results: list[IssuedCoupon | CouponError]
    facts: CampaignFacts | None = None
    sold_out: bool = False  # the campaign has no coupon left (permanent)


@dataclass(slots=True)
class _Claim:
    """One claim on a position: an anonymous call, or every call of one user or one key."""

    user_id: str | None
    key: str | None
    calls: list[int] = field(default_factory=list)  # indexes into the group
    held: IssuedCoupon | None = None  # a code stored earlier: these callers get it back


class IssuedRecorder(Protocol):
    """Writes what the group issued somewhere else in the same transaction (webhook events).

    The group's new codes are the campaign's positions first_seq..last_seq (seq), all of them:
    a group stores its winners at consecutive positions (see _insert_codes).
    """

    async def __call__(
        self,
        conn: AsyncConnection[Any],
        campaign_id: uuid.UUID,
        first_seq: int,
        last_seq: int,
        at: datetime,
    ) -> None: ...


async def issue_group(
    conn: AsyncConnection[Any],
    sql: Mapping[str, str],
    campaign_id: uuid.UUID,
    requests: Sequence[IssueRequest],
    trace: GroupTrace | None = None,
    *,
    on_issued: IssuedRecorder | None = None,
) -> GroupOutcome:
    results: list[IssuedCoupon | CouponError | None] = [None] * len(requests)
    async with conn.transaction():
        cursor = await conn.execute(
            sql["take_many"], {"campaign_id": campaign_id, "wanted": _wanted(requests)}
        )
        taken = await cursor.fetchone()
        if taken is None:
            return await _explain_refusal(conn, sql, campaign_id, requests, results)
        before, after, total, start_time, now, end_time, *discount, xid = taken
        if trace is not None:
            trace.xid, trace.db_now = xid, now
        facts = CampaignFacts(total, start_time, end_time, discount_of(*discount))
        outcome = GroupOutcome(results=[], facts=facts)

        claims = _claims(requests, await _held_codes(conn, sql, campaign_id, requests), results)
        needing = []
        for claim in claims:
            if claim.held is not None:
                _settle(results, claim, claim.held, facts, repeat=True)
            else:
                needing.append(claim)
        granted = after - before
        winners, losers = needing[:granted], needing[granted:]
        unused = granted - len(winners)
        if unused:
            await conn.execute(sql["give_back"], {"campaign_id": campaign_id, "unused": unused})
        codes = await _insert_codes(conn, sql, campaign_id, before=before, winners=winners, now=now)
        for claim, code in zip(winners, codes, strict=True):
            _settle(results, claim, IssuedCoupon(code=code, issued_at=now), facts, repeat=False)
        for claim in losers:
            _fail(results, claim, SoldOut())
        if on_issued is not None and codes:
            await on_issued(conn, campaign_id, before + 1, before + len(codes), now)
        outcome.sold_out = after - unused >= total
        outcome.results = _complete(results)
        if trace is not None:
            trace.pending = outcome  # from here on, COMMIT decides
    return outcome


def _wanted(requests: Sequence[IssueRequest]) -> int:
    """How many positions the group may need, known before the lookup: an upper bound.

    A call equal to an earlier one of the group (same user and key, not both empty) never
    needs a position of its own: it joins or repeats the earlier call's claim, or is refused
    like it.
    """
    named = {(r.user_id, r.idempotency_key) for r in requests}
    anonymous = sum(1 for r in requests if r.user_id is None and r.idempotency_key is None)
    return anonymous + len(named - {(None, None)})


def _claims(
    requests: Sequence[IssueRequest],
    held: list[tuple[str | None, str | None, str, datetime]],
    results: list[IssuedCoupon | CouponError | None],
) -> list[_Claim]:
    """Sort the group's calls into claims in arrival order, knowing the codes already held.

    A call joins the claim of its key (refused if that key belongs to another user), else the
    claim of its user, else starts a claim of its own. Only claims with calls are returned.
    """
    by_key: dict[str, _Claim] = {}
    by_user: dict[str, _Claim] = {}
    for user_id, key, code, issued_at in held:
        stored = _Claim(user_id, key, held=IssuedCoupon(code=code, issued_at=issued_at))
        if key is not None:
            by_key[key] = stored
        if user_id is not None:
            by_user[user_id] = stored
    claims: list[_Claim] = []
    for index, request in enumerate(requests):
        user_id, key = request.user_id, request.idempotency_key
        claim = by_key.get(key) if key is not None else None
        if claim is not None and claim.user_id != user_id:
            results[index] = IdempotencyKeyReused()
            continue
        if claim is None and user_id is not None:
            claim = by_user.get(user_id)
        if claim is None:
            claim = _Claim(user_id, key)
            if key is not None:
                by_key[key] = claim
            if user_id is not None:
                by_user[user_id] = claim
        if not claim.calls:
            claims.append(claim)
        claim.calls.append(index)
    return claims


async def _held_codes(
    conn: AsyncConnection[Any],
    sql: Mapping[str, str],
    campaign_id: uuid.UUID,
    requests: Sequence[IssueRequest],
) -> list[tuple[str | None, str | None, str, datetime]]:
    users = list({r.user_id for r in requests if r.user_id is not None})
    keys = list({r.idempotency_key for r in requests if r.idempotency_key is not None})
    if not users and not keys:
        return []
    cursor = await conn.execute(
        sql["held_codes"], {"campaign_id": campaign_id, "user_ids": users, "keys": keys}
    )
    return [
        (user_id, key, code, issued_at) for user_id, key, code, issued_at in await cursor.fetchall()
    ]


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
    claim_by_seq = {before + 1 + i: claim for i, claim in enumerate(winners)}
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
                "user_ids": [claim_by_seq[seq].user_id for seq in draws],
                "keys": [claim_by_seq[seq].key for seq in draws],
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
    requests: Sequence[IssueRequest],
    results: list[IssuedCoupon | CouponError | None],
) -> GroupOutcome:
    cursor = await conn.execute(sql["campaign_state"], {"campaign_id": campaign_id})
    row = await cursor.fetchone()
    if row is None:
        return GroupOutcome(results=[CampaignNotFound() for _ in results])
    total, start_time, started, ended, end_time, *discount = row
    facts = CampaignFacts(total, start_time, end_time, discount_of(*discount))
    if not started:
        return GroupOutcome([CampaignNotStarted(start_time) for _ in results], facts)
    # Ended, or started and take_many found no position: sold out. Holders still get their
    # codes back (no other transaction can store one now, so the lookup needs no lock).
    refusal: CouponError = CampaignEnded() if ended else SoldOut()
    for claim in _claims(requests, await _held_codes(conn, sql, campaign_id, requests), results):
        if claim.held is not None:
            _settle(results, claim, claim.held, facts, repeat=True)
        else:
            _fail(results, claim, refusal)
    return GroupOutcome(_complete(results), facts, sold_out=not ended)


def _settle(
    results: list[IssuedCoupon | CouponError | None],
    claim: _Claim,
    coupon: IssuedCoupon,
    facts: CampaignFacts,
    *,
    repeat: bool,
) -> None:
    for n, index in enumerate(claim.calls):
        # A second call of one user (or key) in the same group is a repeat of the first.
        results[index] = IssuedCoupon(
            coupon.code,
            coupon.issued_at,
            repeat=repeat or n > 0,
            expires_at=facts.end_time,
            discount=facts.discount,
        )


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
