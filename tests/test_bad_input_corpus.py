"""Several hundred malformed requests: every answer is a 4xx (with a Connect error body where
the protocol has one), nothing is a 500, and the server keeps serving."""

from __future__ import annotations

import gzip
import itertools
import json
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.support import SERVICE, call

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

METHODS = (
    "CreateCampaign",
    "IssueCoupon",
    "GetCampaign",
    "GetCoupon",
    "RedeemCoupon",
    "CancelRedemption",
)
# Each body sets one field, so a request that needs two is always incomplete. ListCampaigns is
# left out: every field of it is optional, so such a body may well be valid.
FIELDS = {
    "CreateCampaign": ("name", "total", "startTime", "endTime", "discount", "metadata", "brand"),
    "IssueCoupon": ("campaignId", "userId", "idempotencyKey"),
    "GetCampaign": ("campaignId", "pageSize", "pageToken"),
    "GetCoupon": ("code",),
    "RedeemCoupon": ("code", "orderId", "userId"),
    "CancelRedemption": ("code", "orderId"),
}
WRONG_VALUES: list[object] = [
    None,
    True,
    1.5,
    -1,
    2**31,
    2**63,
    -(2**63) - 1,
    10**400,
    "",
    "x" * 300,
    [],
    [1],
    {},
    {"a": 1},
    "\u0000",
    "🎟️" * 50,
    "2030-13-45T99:99:99Z",
    "not-a-uuid",
    "0" * 36,
]
RAW_BODIES: list[bytes] = [
    b"",
    b"{",
    b"}",
    b"[]",
    b"null",
    b"0",
    b'"string"',
    b"{,}",
    b'{"a":}',
    b"{'single': 1}",
    b'{"name": "x", "total": 1,}',
    b'{"name": "\xff\xfe", "total": 1}',
    b"\xff\xff\xff\xff",
    b'{"name": "\\ud800", "total": 1}',
    b'{"total": 1e999}',
    b'{"total": NaN}',
    b'{"total": -Infinity}',
    b"[" * 5_000 + b"]" * 5_000,
    b'{"a":' * 3_000 + b"1" + b"}" * 3_000,
    b"\x00" * 64,
    b'{"total": "0x10"}',
]


def corpus() -> list[tuple[str, dict[str, str], bytes]]:
    json_headers = {"Content-Type": "application/json"}
    cases: list[tuple[str, dict[str, str], bytes]] = []
    for method in METHODS:
        for field, value in itertools.product(FIELDS[method], WRONG_VALUES):
            cases.append((method, json_headers, json.dumps({field: value}).encode()))
            cases.append((method, json_headers, json.dumps({field: [value, value]}).encode()))
        cases.append((method, json_headers, json.dumps({"unknownField": 1}).encode()))
        for body in RAW_BODIES:
            cases.append((method, json_headers, body))
        cases.append((method, json_headers, b'{"name": "' + b"x" * 70_000 + b'"}'))
        for content_type in (
            "text/plain",
            "application/xml",
            "application/connect+json",
            "",
            "application/json; charset=latin-1",
            "multipart/form-data",
        ):
            cases.append((method, {"Content-Type": content_type}, b"{}"))
        for garbage in (b"\x0a\xff\xff\xff\xff\x0f", b"\x08" * 20, b"\x12\x05ab"):
            cases.append((method, {"Content-Type": "application/proto"}, garbage))
        cases.append((method, {**json_headers, "Content-Encoding": "gzip"}, b"not gzip"))
        cases.append(
            (method, {**json_headers, "Content-Encoding": "gzip"}, gzip.compress(b"{" * 100_000))
        )
        cases.append((method, {**json_headers, "Connect-Protocol-Version": "2"}, b"{}"))
        cases.append((method, {**json_headers, "Connect-Timeout-Ms": "soon"}, b"{}"))
        cases.append((method, {**json_headers, "Connect-Timeout-Ms": "12345678901"}, b"{}"))
        cases.append((method, {"Content-Type": "application/grpc"}, b"\x00\x00\x00\x00\x00"))
    for name in ("Nope", "issueCoupon", "IssueCoupon/extra", "", "../../etc/passwd"):
        cases.append((name, {"Content-Type": "application/json"}, b"{}"))
    return cases


CORPUS = corpus()
HTTP_ONLY_STATUSES = {404, 405, 415}  # protocol-level refusals carry no Connect error body


def test_the_corpus_is_several_hundred_requests() -> None:
    assert len(CORPUS) >= 300


@pytest.fixture
async def plain_client(server: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server, timeout=30) as client:
        yield client


async def test_every_malformed_request_gets_a_4xx_and_the_server_stays_up(
    plain_client: httpx.AsyncClient,
) -> None:
    failures = []
    for method, headers, body in CORPUS:
        response = await plain_client.post(f"{SERVICE}/{method}", content=body, headers=headers)
        if not 400 <= response.status_code < 500:
            failures.append((method, headers, body[:60], response.status_code, response.text[:200]))
            continue
        if response.status_code in HTTP_ONLY_STATUSES:
            continue
        error = response.json()
        if set(error) != {"code", "message"} or not error["message"]:
            failures.append((method, headers, body[:60], response.status_code, error))
    assert failures == [], "\n".join(map(repr, failures))
    for verb in ("GET", "PUT", "DELETE"):
        response = await plain_client.request(verb, f"{SERVICE}/IssueCoupon")
        assert response.status_code == 405
    assert (await plain_client.get("/healthz")).status_code == 200
    status, _ = await call(plain_client, "CreateCampaign", {"name": "still here", "total": 1})
    assert status == 200


async def test_an_unknown_compression_is_unimplemented_as_connect_prescribes(
    plain_client: httpx.AsyncClient,
) -> None:
    response = await plain_client.post(
        f"{SERVICE}/IssueCoupon",
        content=b"{}",
        headers={"Content-Type": "application/json", "Content-Encoding": "br"},
    )
    assert response.status_code == 501
    assert response.json()["code"] == "unimplemented"
    assert "gzip" in response.json()["message"]
