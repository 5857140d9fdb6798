"""Customers' JWTs: each way a token can be wrong answers as specified, and the server stays up."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec as elliptic
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

from coupon.app import create_app
from coupon.config import ConfigError, JwtConfig
from coupon.customers import CustomerTokens
from coupon.errors import Unauthenticated
from coupon.store.memory import MemoryStore
from tests.auth_support import (
    AUDIENCE,
    ISSUER,
    KEYS,
    KeyPair,
    bearer,
    ec_pair,
    jwt_config,
    locked_auth,
    rsa_pair,
)
from tests.support import JSON, SERVICE, ServerThread

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from coupon.config import Config


@pytest.fixture(scope="module")
def rsa() -> KeyPair:
    return rsa_pair()


@pytest.fixture(scope="module")
def ec() -> KeyPair:
    return ec_pair()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_signed_with(secret: bytes, claims: dict[str, Any]) -> str:
    """An HS256 token whose HMAC key is `secret`: the algorithm-confusion forgery when `secret`
    is the server's public key (PyJWT refuses to make one, so it is made by hand)."""
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


def tampered(token: str, **changes: Any) -> str:
    head, body, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims.update(changes)
    return f"{head}.{b64(json.dumps(claims).encode())}.{signature}"


class Locked:
    """A memory-store server that wants customers' JWTs verified with `pair`'s public key."""

    def __init__(self, config: Config, pair: KeyPair, directory: Path) -> None:
        auth = locked_auth(jwt_config(pair.write_public(directory)))
        self._server = ServerThread(create_app(replace(config, auth=auth), MemoryStore()))
        self.base_url = ""

    def __enter__(self) -> Locked:
        self.base_url = self._server.__enter__().base_url
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.__exit__(*exc)


@pytest.fixture
def rsa_server(config: Config, rsa: KeyPair, tmp_path: Path) -> Iterator[str]:
    with Locked(config, rsa, tmp_path) as server:
        yield server.base_url


def issue(base_url: str, campaign_id: str, token: str | None, **body: str) -> httpx.Response:
    headers = {**JSON, **(bearer(token) if token is not None else {})}
    return httpx.post(
        f"{base_url}{SERVICE}/IssueCoupon",
        json={"campaignId": campaign_id, **body},
        headers=headers,
        timeout=10,
    )


def campaign(base_url: str) -> str:
    response = httpx.post(
        f"{base_url}{SERVICE}/CreateCampaign",
        json={"name": "jwt", "total": 100},
        headers={**JSON, **bearer(KEYS["ops"][0])},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["campaignId"])


def holder(base_url: str, code: str) -> str:
    response = httpx.post(
        f"{base_url}{SERVICE}/GetCoupon",
        json={"code": code},
        headers={**JSON, **bearer(KEYS["ops"][0])},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return str(response.json().get("userId", ""))


def test_each_kind_of_token_answers_as_specified(rsa_server: str, rsa: KeyPair) -> None:
    campaign_id = campaign(rsa_server)
    now = int(time.time())
    public_pem = rsa.public_pem
    valid_claims = {"sub": "carol", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 600}
    cases: list[tuple[str, str | None, dict[str, str], int, str]] = [
        ("valid RS256", rsa.token("alice"), {}, 200, "ok"),
        ("valid RS256, body userId = sub", rsa.token("bob"), {"userId": "bob"}, 200, "ok"),
        ("no token", None, {}, 401, "unauthenticated"),
        ("not a JWT", "tok-guessed-0000", {}, 401, "unauthenticated"),
        ("expired", rsa.token("u1", exp=now - 3600), {}, 401, "unauthenticated"),
        ("not yet valid", rsa.token("u2", nbf=now + 3600), {}, 401, "unauthenticated"),
        ("wrong issuer", rsa.token("u3", iss="https://evil.test"), {}, 401, "unauthenticated"),
        ("wrong audience", rsa.token("u4", aud="another-app"), {}, 401, "unauthenticated"),
        ("no exp", rsa.token("u5", exp=None), {}, 401, "unauthenticated"),
        ("no sub", rsa.token(None), {}, 401, "unauthenticated"),
        (
            "alg none",
            jwt.encode({**valid_claims, "sub": "u6"}, None, algorithm="none"),
            {},
            401,
            "unauthenticated",
        ),
        (
            "HS256 signed with the RS256 public key",
            hs256_signed_with(public_pem, {**valid_claims, "sub": "u7"}),
            {},
            401,
            "unauthenticated",
        ),
        (
            "tampered payload (sub changed)",
            tampered(rsa.token("u8"), sub="alice"),
            {},
            401,
            "unauthenticated",
        ),
        ("signed by another key", rsa_pair().token("u9"), {}, 401, "unauthenticated"),
        (
            "body userId differs from sub",
            rsa.token("dave"),
            {"userId": "alice"},
            403,
            "permission_denied",
        ),
    ]
    results = []
    for name, token, body, status, code in cases:
        response = issue(rsa_server, campaign_id, token, **body)
        got = "ok" if response.status_code == 200 else response.json()["code"]
        results.append((name, response.status_code, got, response.json().get("message", "")))
        assert (response.status_code, got) == (status, code), (name, response.text)
    print("\nJWT cases (RS256 key file):")
    for name, status, got, message in results:
        print(f"  {name:<40} {status} {got:<18} {message}")

    # The code went to the token's subject, and the server is still up and serving.
    alice = issue(rsa_server, campaign_id, rsa.token("alice"))
    assert alice.status_code == 200
    assert holder(rsa_server, alice.json()["code"]) == "alice"
    assert httpx.get(rsa_server + "/healthz", timeout=5).status_code == 200


def test_an_es256_key_verifies_es256_tokens_only(
    config: Config, ec: KeyPair, rsa: KeyPair, tmp_path: Path
) -> None:
    with Locked(config, ec, tmp_path) as server:
        campaign_id = campaign(server.base_url)
        valid = issue(server.base_url, campaign_id, ec.token("erin"))
        assert valid.status_code == 200, valid.text
        assert holder(server.base_url, valid.json()["code"]) == "erin"
        # RS256 is listed in the config, but an EC key cannot verify it.
        other = issue(server.base_url, campaign_id, rsa.token("erin"))
        assert (other.status_code, other.json()["code"]) == (401, "unauthenticated")
        print(
            f"\nJWT cases (ES256 key file): valid ES256 {valid.status_code}, "
            f"RS256 token {other.status_code} {other.json()['code']}"
        )


def test_a_remembered_token_still_expires(rsa: KeyPair, tmp_path: Path) -> None:
    now = [time.time()]
    tokens = CustomerTokens(jwt_config(rsa.write_public(tmp_path)), {}, now=lambda: now[0])
    token = rsa.token("frank", exp=int(now[0]) + 60)
    assert tokens.user_id(token) == "frank"
    assert tokens.user_id(token) == "frank"  # from the cache
    now[0] += 60 + 5  # past exp and the 5 s leeway
    with pytest.raises(Unauthenticated, match="expired"):
        tokens.user_id(token)


def test_the_cache_stays_bounded(rsa: KeyPair, tmp_path: Path) -> None:
    tokens = CustomerTokens(jwt_config(rsa.write_public(tmp_path)), {}, cache_size=3)
    issued = [rsa.token(f"user-{i}") for i in range(5)]
    assert [tokens.user_id(t) for t in issued] == [f"user-{i}" for i in range(5)]
    assert len(tokens._verified) == 3
    assert tokens.user_id(issued[0]) == "user-0"  # evicted, verified again


def test_a_jwks_file_picks_the_key_by_kid(rsa: KeyPair, ec: KeyPair, tmp_path: Path) -> None:
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(load_pem_public_key(rsa.public_pem)))
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(load_pem_public_key(ec.public_pem)))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**rsa_jwk, "kid": "rsa-1"}, {**ec_jwk, "kid": "ec-1"}]}))
    config = JwtConfig(
        algorithms=("RS256", "ES256"), issuer=ISSUER, audience=AUDIENCE, jwks_file=str(path)
    )
    tokens = CustomerTokens(config, {})

    def signed(pair: KeyPair, kid: str, sub: str) -> str:
        claims = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60}
        return jwt.encode(claims, pair.private_key, algorithm=pair.algorithm, headers={"kid": kid})

    assert tokens.user_id(signed(rsa, "rsa-1", "gina")) == "gina"
    assert tokens.user_id(signed(ec, "ec-1", "hank")) == "hank"
    for wrong in (signed(rsa, "ec-1", "x"), signed(rsa, "nope", "x"), rsa.token("x")):
        with pytest.raises(Unauthenticated):
            tokens.user_id(wrong)


def test_an_hs256_secret_comes_from_the_environment(tmp_path: Path) -> None:
    secret = "s" * 40
    config = JwtConfig(
        algorithms=("HS256",), issuer=ISSUER, audience=AUDIENCE, hs256_secret_env="JWT_SECRET"
    )
    tokens = CustomerTokens(config, {"JWT_SECRET": secret})
    claims = {"sub": "ivy", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60}
    assert tokens.user_id(jwt.encode(claims, secret, algorithm="HS256")) == "ivy"
    with pytest.raises(Unauthenticated):
        tokens.user_id(jwt.encode(claims, "t" * 40, algorithm="HS256"))
    with pytest.raises(ConfigError, match="JWT_SECRET") as refused:
        CustomerTokens(config, {"JWT_SECRET": "short"})
    assert "short" not in str(refused.value)


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("missing file", "cannot read"),
        ("not a key", "PEM public key"),
        ("EC key, RS256 only", "verifies none of"),
        ("P-384 key, ES256 only", "verifies none of"),
    ],
)
def test_a_key_file_that_cannot_serve_stops_start_up(
    what: str, message: str, ec: KeyPair, tmp_path: Path
) -> None:
    path = tmp_path / "key.pem"
    if what == "not a key":
        path.write_text("hello\n")
    elif what == "EC key, RS256 only":
        path.write_bytes(ec.public_pem)
    elif what == "P-384 key, ES256 only":
        public = elliptic.generate_private_key(elliptic.SECP384R1()).public_key()
        path.write_bytes(public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    algorithms = ("ES256",) if what.startswith("P-384") else ("RS256",)
    with pytest.raises(ConfigError, match=message):
        CustomerTokens(jwt_config(path, algorithms=algorithms), {})
