"""Who may call what, over real HTTP on both stores: the permission matrix, brand scope, and
the method table checked against the generated service descriptor."""

from __future__ import annotations

import contextvars
import itertools
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from coupon.app import create_app
from coupon.auth import METHOD_ROLES, PUBLIC_METHODS, Authenticator, roles_for
from coupon.caller import Caller, CallerFilter, set_caller
from coupon.config import AuthConfig
from coupon.errors import Unauthenticated
from coupon.gen.coupon_connect import CouponService
from coupon.logs import JsonFormatter
from coupon.store.memory import MemoryStore
from coupon.store.postgres import PostgresStore
from tests.auth_support import KEYS, bearer, jwt_config, locked_auth, rsa_pair
from tests.support import JSON, SERVICE, ServerThread, wait_until_healthy

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from coupon.config import Config
    from coupon.store import Store
    from tests.auth_support import KeyPair


def test_every_method_of_the_service_is_classified_exactly_once() -> None:
    methods = {method.name for method in CouponService.desc().methods}
    assert methods == PUBLIC_METHODS | set(METHOD_ROLES)
    assert not PUBLIC_METHODS & set(METHOD_ROLES)
    assert {"IssueCoupon"} == PUBLIC_METHODS


def test_a_method_nobody_classified_is_for_admins_only() -> None:
    assert roles_for("SomeMethodAddedLater") == {"admin"}


@pytest.mark.parametrize("keys", ["no keys", "keys"])
@pytest.mark.parametrize("customers", ["no customer JWTs", "customer JWTs"])
def test_the_callers_known_without_a_credential_are_the_ones_caller_for_gives(
    keys: str, customers: str, tmp_path: Path
) -> None:
    """identify() skips the headers for the methods in caller_without_credential: for each,
    caller_for must give that caller whatever the call carries; every other method must
    depend on the credential (refused without one, or needing a customer's token)."""
    customers_jwt = (
        jwt_config(rsa_pair().write_public(tmp_path)) if customers == "customer JWTs" else None
    )
    config = (
        locked_auth(customers_jwt) if keys == "keys" else AuthConfig(customers_jwt=customers_jwt)
    )
    authenticator = Authenticator(config)
    known = authenticator.caller_without_credential
    some_key = next(iter(KEYS.values()))[0]
    for method in sorted(PUBLIC_METHODS | set(METHOD_ROLES)):
        if method in known:
            for authorization in (None, "", "Bearer not-a-key", f"Bearer {some_key}"):
                assert authenticator.caller_for(method, authorization) == known[method]
        else:
            with pytest.raises(Unauthenticated):
                authenticator.caller_for(method, None)
    expected_open = {
        ("no keys", "no customer JWTs"): PUBLIC_METHODS | set(METHOD_ROLES),
        ("no keys", "customer JWTs"): set(METHOD_ROLES),
        ("keys", "no customer JWTs"): PUBLIC_METHODS,
        ("keys", "customer JWTs"): set(),
    }
    assert set(known) == expected_open[keys, customers]


# --- the matrix: every method x every kind of credential, on both stores ---

COLUMNS = ["no token", "wrong token", *KEYS, "customer JWT"]
OK, UNAUTH, DENIED, NOT_FOUND = "ok", "unauthenticated", "permission_denied", "not_found"
HIDDEN = "ok, A hidden"  # ListCampaigns answered, without the other brand's campaign
# Campaign A and its codes belong to brand acme. Columns in COLUMNS order.
EXPECTED = {
    "CreateCampaign": [UNAUTH, UNAUTH, DENIED, OK, OK, OK, UNAUTH],
    "IssueCoupon": [UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, OK],
    "GetCampaign": [UNAUTH, UNAUTH, DENIED, OK, NOT_FOUND, OK, UNAUTH],
    "ListCampaigns": [UNAUTH, UNAUTH, DENIED, OK, HIDDEN, OK, UNAUTH],
    "GetCoupon": [UNAUTH, UNAUTH, OK, OK, NOT_FOUND, OK, UNAUTH],
    "RedeemCoupon": [UNAUTH, UNAUTH, OK, OK, NOT_FOUND, OK, UNAUTH],
    "CancelRedemption": [UNAUTH, UNAUTH, OK, OK, NOT_FOUND, OK, UNAUTH],
}
STATUS = {OK: 200, HIDDEN: 200, UNAUTH: 401, DENIED: 403, NOT_FOUND: 404}


@pytest.fixture(scope="module")
def keypair() -> KeyPair:
    return rsa_pair()


def locked_config(config: Config, keypair: KeyPair, directory: Path) -> Config:
    return replace(config, auth=locked_auth(jwt_config(keypair.write_public(directory))))


@pytest.fixture
def locked_server(store: Store, config: Config, keypair: KeyPair, tmp_path: Path) -> Iterator[str]:
    app_store = PostgresStore(store.config) if isinstance(store, PostgresStore) else store
    with ServerThread(create_app(locked_config(config, keypair, tmp_path), app_store)) as server:
        wait_until_healthy(server.base_url, path="/readyz")
        yield server.base_url


@pytest.fixture
async def http(locked_server: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=locked_server, timeout=30, headers=JSON) as client:
        yield client


async def rpc(
    http: httpx.AsyncClient, method: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    response = await http.post(f"{SERVICE}/{method}", json=body, headers=headers)
    return response.status_code, response.json()


class World:
    """Campaigns of two brands and helpers that set up each cell's own code."""

    def __init__(self, http: httpx.AsyncClient, keypair: KeyPair) -> None:
        self.http = http
        self.keypair = keypair
        self.ops = bearer(KEYS["ops"][0])
        self._users = itertools.count()
        self.campaign_a = ""
        self.campaign_b = ""

    async def setup(self) -> None:
        self.campaign_a = await self.create("acme")
        self.campaign_b = await self.create("globex")

    async def create(self, brand: str) -> str:
        status, body = await rpc(
            self.http, "CreateCampaign", {"name": brand, "total": 1000, "brand": brand}, self.ops
        )
        assert status == 200, body
        return str(body["campaignId"])

    def customer(self) -> tuple[str, dict[str, str]]:
        user = f"user-{next(self._users)}"
        return user, bearer(self.keypair.token(user))

    async def code(self, campaign_id: str) -> dict[str, str]:
        """A fresh code of the campaign, issued to a fresh customer: {code, userId}."""
        user, headers = self.customer()
        status, body = await rpc(self.http, "IssueCoupon", {"campaignId": campaign_id}, headers)
        assert status == 200, body
        return {"code": str(body["code"]), "userId": user}

    async def redeemed_code(self, campaign_id: str, order_id: str) -> dict[str, str]:
        coupon = await self.code(campaign_id)
        status, body = await rpc(
            self.http, "RedeemCoupon", {**coupon, "orderId": order_id}, self.ops
        )
        assert status == 200, body
        return {"code": coupon["code"]}

    def headers(self, column: str) -> dict[str, str]:
        if column == "no token":
            return {}
        if column == "wrong token":
            return bearer("tok-guessed-0000")
        if column == "customer JWT":
            return self.customer()[1]
        return bearer(KEYS[column][0])

    async def cell(self, method: str, column: str) -> str:
        headers = self.headers(column)
        body: dict[str, Any]
        if method == "CreateCampaign":
            body = {"name": "matrix", "total": 5}
        elif method == "IssueCoupon" or method == "GetCampaign":
            body = {"campaignId": self.campaign_a}
        elif method == "ListCampaigns":
            body = {"pageSize": 100}
        elif method == "GetCoupon":
            body = {"code": (await self.code(self.campaign_a))["code"]}
        elif method == "RedeemCoupon":
            body = {**await self.code(self.campaign_a), "orderId": "order-1"}
        elif method == "CancelRedemption":
            body = {**await self.redeemed_code(self.campaign_a, "order-1"), "orderId": "order-1"}
        else:
            raise AssertionError(f"no matrix cell for {method}")
        status, answer = await rpc(self.http, method, body, headers)
        outcome = OK if status == 200 else str(answer.get("code"))
        if method == "ListCampaigns" and status == 200:
            listed = {c["campaignId"] for c in answer.get("campaigns", [])}
            if self.campaign_a not in listed:
                outcome = HIDDEN
        assert status == STATUS.get(outcome, status), (method, column, status, answer)
        return outcome


async def test_permission_matrix(store: Store, http: httpx.AsyncClient, keypair: KeyPair) -> None:
    world = World(http, keypair)
    await world.setup()
    seen = {method: [await world.cell(method, column) for column in COLUMNS] for method in EXPECTED}
    width = max(map(len, [*COLUMNS, OK, UNAUTH, DENIED, NOT_FOUND, HIDDEN]))
    lines = [" " * 17 + " ".join(c.ljust(width) for c in COLUMNS)]
    lines += [f"{m:<17}" + " ".join(c.ljust(width) for c in row) for m, row in seen.items()]
    print(f"\npermission matrix ({type(store).__name__}):\n" + "\n".join(lines))
    assert seen == EXPECTED


async def test_a_brand_key_works_inside_its_brand_only(
    store: Store, http: httpx.AsyncClient, keypair: KeyPair
) -> None:
    world = World(http, keypair)
    await world.setup()
    acme, globex = bearer(KEYS["acme-admin"][0]), bearer(KEYS["globex-admin"][0])
    checkout = bearer(KEYS["acme-checkout"][0])

    # A brand key creates campaigns of its own brand, whatever the body says.
    status, body = await rpc(http, "CreateCampaign", {"name": "x", "total": 1}, acme)
    assert status == 200
    status, got = await rpc(http, "GetCampaign", {"campaignId": body["campaignId"]}, world.ops)
    assert (status, got["brand"]) == (200, "acme")
    status, body = await rpc(
        http, "CreateCampaign", {"name": "x", "total": 1, "brand": "globex"}, acme
    )
    assert (status, body["code"]) == (403, DENIED)

    # Another brand's code is not found for the brand's checkout, whatever the call.
    globex_coupon = await world.code(world.campaign_b)
    globex_code = {"code": globex_coupon["code"]}
    for method, body in [
        ("GetCoupon", globex_code),
        ("RedeemCoupon", {**globex_coupon, "orderId": "o-9"}),
        ("CancelRedemption", {**globex_code, "orderId": "o-9"}),
    ]:
        status, answer = await rpc(http, method, body, checkout)
        assert (status, answer["code"]) == (404, NOT_FOUND), method
    status, answer = await rpc(http, "GetCoupon", globex_code, globex)
    assert (status, answer["state"]) == (200, "COUPON_STATE_ISSUED")

    # Each brand lists only its own campaigns; the all-brands key lists both.
    for headers, wanted in [
        (acme, {world.campaign_a}),
        (globex, {world.campaign_b}),
        (world.ops, {world.campaign_a, world.campaign_b}),
    ]:
        status, listed = await rpc(http, "ListCampaigns", {"pageSize": 100}, headers)
        ids = {c["campaignId"] for c in listed.get("campaigns", [])}
        assert status == 200
        assert wanted <= ids
        assert not ({world.campaign_a, world.campaign_b} - wanted) & ids


async def test_the_key_name_reaches_metrics_and_logs_and_the_token_never_does(
    config: Config, keypair: KeyPair, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app = create_app(locked_config(config, keypair, tmp_path), MemoryStore())
    with ServerThread(app) as server:
        async with httpx.AsyncClient(base_url=server.base_url, headers=JSON) as http:
            await check_names_in_metrics_and_logs(http, caplog)


async def check_names_in_metrics_and_logs(
    http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    token = KEYS["acme-admin"][0]
    status, _ = await rpc(http, "CreateCampaign", {"name": "m", "total": 1}, bearer(token))
    assert status == 200
    status, _ = await rpc(http, "ListCampaigns", {}, bearer(KEYS["acme-checkout"][0]))
    assert status == 403
    metrics = (await http.get("/metrics")).text
    assert 'code="ok",key="acme-admin",method="CreateCampaign"' in metrics
    assert 'code="permission_denied",key="acme-checkout",method="ListCampaigns"' in metrics
    assert "by=acme-admin" in caplog.text
    assert token not in caplog.text
    assert token not in metrics


def test_log_lines_carry_the_callers_key_name() -> None:
    record = logging.LogRecord("coupon.x", logging.INFO, __file__, 1, "hello", (), None)
    context = contextvars.copy_context()

    def as_acme() -> None:
        set_caller(Caller(name="acme-admin", role="admin", brand="acme"))
        CallerFilter().filter(record)

    context.run(as_acme)
    assert '"caller": "acme-admin"' in JsonFormatter().format(record)
