"""Races on a real multi-worker server and real PostgreSQL: redemption is exact, retries are
safe, the history replays to the state, and the database clock ends a campaign for every
worker at once. Each test prints one summary line and checks what clients were told against
what the database holds."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from tests.server_process import ServerProcess
from tests.support import SERVICE, pooled_client
from tests.test_lifecycle_contract import reason

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import httpx

WORKERS = 4
CONNECTIONS = 200
INTERLEAVE_S = 3.0  # how long the redeem/cancel interleaving runs (bounded in count too)
INTERLEAVE_MAX_ROUNDS = 5_000


class Client:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def call(self, method: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        response = await self.http.post(f"{SERVICE}/{method}", json=body)
        return response.status_code, response.json()

    async def ok(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        status, reply = await self.call(method, body)
        assert status == 200, reply
        return reply

    async def one_code(self, **campaign: object) -> tuple[str, str]:
        created = await self.ok("CreateCampaign", {"name": "race", "total": 1, **campaign})
        issued = await self.ok("IssueCoupon", {"campaignId": created["campaignId"]})
        return created["campaignId"], issued["code"]


async def rows(dsn: str, query: str, *params: object) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute(query, params or None)  # type: ignore[arg-type]
        return await cursor.fetchall()


def audit_queries() -> list[str]:
    """The audit queries operators run, exactly as docs/postgres.md shows them."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "postgres.md").read_text()
    block = text.split("## Audit", 1)[1].split("```sql", 1)[1].split("```", 1)[0]
    queries = [q.strip() for q in block.split(";") if q.strip()]
    assert len(queries) == 4, queries
    return queries


async def redemption_audit(dsn: str) -> list[tuple[Any, ...]]:
    """Every row any audit query returns (expected: none)."""
    found: list[tuple[Any, ...]] = []
    for query in audit_queries():
        found += await rows(dsn, query)
    return found


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, dsn: str, workers: int = WORKERS) -> AsyncIterator[Client]:
    with ServerProcess(tmp_path, dsn, workers=workers) as server:
        server.wait_for("/readyz", 200)
        async with pooled_client(server.base_url, CONNECTIONS) as http:
            yield Client(http)


def outcome(status: int, reply: dict[str, Any]) -> str:
    return "ok" if status == 200 else reason(reply)


async def test_500_orders_racing_for_one_code_leave_exactly_one_winner(
    tmp_path: Path, pg_dsn: str
) -> None:
    calls = 500
    async with serving(tmp_path, pg_dsn) as client:
        _, code = await client.one_code()
        results = await asyncio.gather(
            *(client.call("RedeemCoupon", {"code": code, "orderId": f"o{i}"}) for i in range(calls))
        )
    outcomes = Counter(outcome(*r) for r in results)
    winners = [reply["orderId"] for status, reply in results if status == 200]
    held = await rows(pg_dsn, "SELECT order_id FROM coupons WHERE code = %s", code)
    history = await rows(pg_dsn, "SELECT order_id, action FROM redemptions WHERE code = %s", code)
    print(
        f"\nredeem race: {calls} orders, {WORKERS} workers: {dict(outcomes)};"
        f" stored holder {held[0][0]}, history {history}"
    )
    assert outcomes == {"ok": 1, "ALREADY_REDEEMED": calls - 1}
    assert held == [(winners[0],)]
    assert history == [(winners[0], "redeem")]
    assert await redemption_audit(pg_dsn) == []


async def test_200_retries_of_one_order_all_succeed_with_one_history_row(
    tmp_path: Path, pg_dsn: str
) -> None:
    calls = 200
    async with serving(tmp_path, pg_dsn) as client:
        _, code = await client.one_code()
        results = await asyncio.gather(
            *(
                client.call("RedeemCoupon", {"code": code, "orderId": "order-1"})
                for _ in range(calls)
            )
        )
    outcomes = Counter(outcome(*r) for r in results)
    answers = {(r["orderId"], r["redeemedAt"]) for _, r in results if "redeemedAt" in r}
    history = await rows(pg_dsn, "SELECT order_id, action FROM redemptions WHERE code = %s", code)
    print(
        f"\nsame-order retries: {calls} calls, {WORKERS} workers: {dict(outcomes)},"
        f" {len(answers)} distinct answer(s); history {history}"
    )
    assert outcomes == {"ok": calls}
    assert len(answers) == 1
    assert history == [("order-1", "redeem")]
    assert await redemption_audit(pg_dsn) == []


async def test_interleaved_redeem_and_cancel_by_two_orders_replay_to_the_final_state(
    tmp_path: Path, pg_dsn: str
) -> None:
    acknowledged: dict[str, Counter[str]] = {"A": Counter(), "B": Counter()}

    async def order_loop(client: Client, code: str, order: str, until: float) -> None:
        # Redeem; when that wins, cancel. Bounded in time and in rounds.
        for _ in range(INTERLEAVE_MAX_ROUNDS):
            if time.monotonic() >= until:
                return
            status, reply = await client.call("RedeemCoupon", {"code": code, "orderId": order})
            acknowledged[order][outcome(status, reply)] += 1
            if status == 200:
                status, reply = await client.call(
                    "CancelRedemption", {"code": code, "orderId": order}
                )
                assert status == 200, reply
                acknowledged[order]["cancelled"] += 1

    async with serving(tmp_path, pg_dsn) as client:
        _, code = await client.one_code()
        until = time.monotonic() + INTERLEAVE_S
        await asyncio.gather(*(order_loop(client, code, o, until) for o in acknowledged))
        # The loops end with the code free; one last redemption leaves a holder to replay to.
        await client.ok("RedeemCoupon", {"code": code, "orderId": "A"})
        acknowledged["A"]["ok"] += 1
        final = await client.ok("GetCoupon", {"code": code})

    history = await rows(
        pg_dsn, "SELECT order_id, action FROM redemptions WHERE code = %s ORDER BY id", code
    )
    holder: str | None = None
    for order, action in history:  # replay: each step must be legal from the state before it
        if action == "redeem":
            assert holder is None, (order, action, holder)
            holder = order
        else:
            assert holder == order, (order, action, holder)
            holder = None
    stored = await rows(pg_dsn, "SELECT order_id FROM coupons WHERE code = %s", code)
    in_history = {o: Counter(a for h, a in history if h == o) for o in acknowledged}
    print(
        f"\nredeem/cancel interleaving: {INTERLEAVE_S:g} s, {WORKERS} workers:"
        f" acknowledged { ({o: dict(c) for o, c in acknowledged.items()}) };"
        f" {len(history)} history rows replay to holder {holder}, stored {stored[0][0]}"
    )
    assert stored == [(holder,)] == [("A",)]
    assert final.get("orderId") == holder
    for order, counts in acknowledged.items():
        # Every acknowledged step is in the history exactly once, and nothing else is.
        assert in_history[order]["redeem"] == counts["ok"]
        assert in_history[order]["cancel"] == counts["cancelled"]
        assert set(counts) <= {"ok", "cancelled", "ALREADY_REDEEMED"}
    assert sum(c["ok"] for c in acknowledged.values()) >= 1
    assert await redemption_audit(pg_dsn) == []


async def test_1000_calls_sharing_100_idempotency_keys_get_100_codes(
    tmp_path: Path, pg_dsn: str
) -> None:
    calls, keys = 1_000, 100
    async with serving(tmp_path, pg_dsn) as client:
        created = await client.ok("CreateCampaign", {"name": "keys", "total": calls})
        campaign_id = created["campaignId"]
        results = await asyncio.gather(
            *(
                client.call(
                    "IssueCoupon", {"campaignId": campaign_id, "idempotencyKey": f"key-{i % keys}"}
                )
                for i in range(calls)
            )
        )
    codes_by_key: dict[str, set[str]] = {}
    for i, (status, reply) in enumerate(results):
        assert status == 200, reply
        codes_by_key.setdefault(f"key-{i % keys}", set()).add(reply["code"])
    stored = dict(
        await rows(
            pg_dsn,
            "SELECT idempotency_key, code FROM coupons WHERE campaign_id = %s",
            campaign_id,
        )
    )
    issued = await rows(pg_dsn, "SELECT issued FROM campaigns WHERE id = %s", campaign_id)
    distinct = {code for codes in codes_by_key.values() for code in codes}
    print(
        f"\nidempotency keys: {calls} calls, {keys} keys, {WORKERS} workers:"
        f" {len(distinct)} distinct codes answered, {len(stored)} stored, issued {issued[0][0]}"
    )
    assert all(len(codes) == 1 for codes in codes_by_key.values())
    assert {key: codes.pop() for key, codes in codes_by_key.items()} == stored
    assert len(distinct) == len(stored) == keys
    assert issued == [(keys,)]


async def test_the_database_clock_ends_issuance_and_redemption_for_every_worker(
    tmp_path: Path, pg_dsn: str
) -> None:
    workers, lanes = 2, 4
    answers: list[tuple[str, str]] = []  # (call, outcome), across every lane
    kept: list[str] = []  # codes issued and never redeemed

    async def lane(client: Client, campaign_id: str) -> None:
        # Issue two codes and redeem one, again and again, until issuance answers ENDED; then
        # every call of each kind must be refused. Bounded in rounds.
        for n in range(100_000):
            status, reply = await client.call("IssueCoupon", {"campaignId": campaign_id})
            answers.append(("issue", outcome(status, reply)))
            if status != 200:
                break
            code = reply["code"]
            if n % 2:
                kept.append(code)
                continue
            status, reply = await client.call("RedeemCoupon", {"code": code, "orderId": code})
            answers.append(("redeem", outcome(status, reply)))

    async with serving(tmp_path, pg_dsn, workers=workers) as client:
        (db_now,) = (await rows(pg_dsn, "SELECT now() + interval '2 seconds'"))[0]
        created = await client.ok(
            "CreateCampaign",
            {"name": "ending", "total": 1_000_000, "endTime": db_now.isoformat()},
        )
        campaign_id = created["campaignId"]
        await asyncio.gather(*(lane(client, campaign_id) for _ in range(lanes)))
        after = [await client.call("IssueCoupon", {"campaignId": campaign_id}) for _ in range(20)]
        late = [
            await client.call("RedeemCoupon", {"code": code, "orderId": "late"})
            for code in kept[:20]
        ]
        states = Counter(
            [(await client.ok("GetCoupon", {"code": code}))["state"] for code in kept[:20]]
        )

    end_time, issued, stored, late_issue, late_redeem, history = (
        await rows(
            pg_dsn,
            """
            SELECT c.end_time, c.issued,
                (SELECT count(*) FROM coupons WHERE campaign_id = c.id),
                (SELECT count(*) FROM coupons WHERE campaign_id = c.id
                    AND issued_at >= c.end_time),
                (SELECT count(*) FROM coupons WHERE campaign_id = c.id
                    AND redeemed_at >= c.end_time),
                (SELECT count(*) FROM redemptions r JOIN coupons k USING (code)
                    WHERE k.campaign_id = c.id)
            FROM campaigns c WHERE c.id = %s
            """,
            campaign_id,
        )
    )[0]
    tally = Counter(answers)
    print(
        f"\nend by the database clock: {workers} workers, {lanes} lanes: {dict(tally)};"
        f" after the end: issue {dict(Counter(outcome(*r) for r in after))},"
        f" redeem {dict(Counter(outcome(*r) for r in late))}, states {dict(states)};"
        f" SQL: issued {issued}, stored {stored}, issued at/after end {late_issue},"
        f" redeemed at/after end {late_redeem}, history rows {history}"
    )
    assert end_time == db_now
    assert tally[("issue", "ok")] == issued == stored
    assert tally[("redeem", "ok")] == history
    # A code issued just before the end may meet the end at its redemption: EXPIRED.
    assert set(tally) <= {
        ("issue", "ok"),
        ("issue", "ENDED"),
        ("redeem", "ok"),
        ("redeem", "EXPIRED"),
    }
    assert tally[("issue", "ENDED")] == lanes
    assert {outcome(*r) for r in after} == {"ENDED"}
    assert kept
    assert {outcome(*r) for r in late} == {"EXPIRED"}
    assert states == {"COUPON_STATE_EXPIRED": len(late)}
    assert (late_issue, late_redeem) == (0, 0)
