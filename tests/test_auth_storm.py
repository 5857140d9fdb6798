"""A locked deployment under a storm: customers with their own JWTs race for a small campaign
on two PostgreSQL workers; every code goes to one verified customer, and only one per customer."""

from __future__ import annotations

import asyncio
import itertools
from typing import TYPE_CHECKING

import psycopg

from tests.auth_support import AUDIENCE, ISSUER, KEYS, bearer, rsa_pair, sha256_hex
from tests.server_process import ServerProcess
from tests.support import SERVICE, pooled_client

if TYPE_CHECKING:
    from pathlib import Path

TOTAL = 100
USERS = 500
CALLS = 2000
CONNECTIONS = 200
WORKERS = 2


async def test_jwt_storm_gives_each_code_to_one_customer(tmp_path: Path, pg_dsn: str) -> None:
    pair = rsa_pair()
    ops_token = KEYS["ops"][0]
    auth: dict[str, object] = {
        "tokens": [{"name": "ops", "sha256": sha256_hex(ops_token), "role": "admin"}],
        "customers": {
            "jwt": {
                "algorithms": ["RS256"],
                "public_key_file": str(pair.write_public(tmp_path)),
                "issuer": ISSUER,
                "audience": AUDIENCE,
            }
        },
    }
    users = [f"customer-{i:03d}" for i in range(USERS)]
    tokens = {user: pair.token(user) for user in users}
    callers = list(itertools.islice(itertools.cycle(users), CALLS))
    with ServerProcess(tmp_path, pg_dsn, workers=WORKERS, auth=auth) as server:
        server.wait_for("/readyz", 200)
        async with pooled_client(server.base_url, CONNECTIONS) as http:
            created = await http.post(
                f"{SERVICE}/CreateCampaign",
                json={"name": "jwt storm", "total": TOTAL},
                headers=bearer(ops_token),
            )
            assert created.status_code == 200, created.text
            campaign_id = created.json()["campaignId"]
            responses = await asyncio.gather(
                *(
                    http.post(
                        f"{SERVICE}/IssueCoupon",
                        json={"campaignId": campaign_id},
                        headers=bearer(tokens[user]),
                    )
                    for user in callers
                )
            )

    acknowledged: dict[str, set[str]] = {}  # code -> users it was answered to
    for user, response in zip(callers, responses, strict=True):
        if response.status_code == 200:
            acknowledged.setdefault(response.json()["code"], set()).add(user)
    refused = [r for r in responses if r.status_code != 200]
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        cursor = await conn.execute(
            "SELECT c.total, c.issued, count(cp.code), count(DISTINCT cp.code),"
            " count(DISTINCT cp.user_id)"
            " FROM campaigns c LEFT JOIN coupons cp ON cp.campaign_id = c.id"
            " WHERE c.id = %s GROUP BY c.id",
            (campaign_id,),
        )
        audit = await cursor.fetchone()
        cursor = await conn.execute(
            "SELECT code, user_id FROM coupons WHERE campaign_id = %s", (campaign_id,)
        )
        stored = {code: user for code, user in await cursor.fetchall()}
    holders = [user for owners in acknowledged.values() for user in owners]
    print(
        f"\nJWT storm: {CALLS} calls from {USERS} customers, {WORKERS} workers:"
        f" {len(acknowledged)} distinct codes answered to {len(set(holders))} customers,"
        f" {len(refused)} refused ({sorted({r.json()['code'] for r in refused})}),"
        f" acknowledged == stored: {dict.fromkeys(acknowledged) == dict.fromkeys(stored)}"
        f"\naudit (total, issued, codes, distinct codes, distinct users): {audit}"
    )
    assert audit == (TOTAL, TOTAL, TOTAL, TOTAL, TOTAL)
    assert set(acknowledged) == set(stored)
    assert all(owners == {stored[code]} for code, owners in acknowledged.items())
    assert len(holders) == len(set(holders)) == TOTAL  # no customer holds two codes
    assert {r.json()["code"] for r in refused} == {"resource_exhausted"}
