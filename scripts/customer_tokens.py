"""Customers' JWTs for the load tools, so a storm can run against a locked deployment.

A server with `auth.customers.jwt` set issues a coupon only to a verified customer. The tools
play the brand's login system: given its signing key (the private half of the key pair whose
public half the server was configured with, or the shared HS256 secret), they mint one token
per simulated customer, `sub` = that customer's user id.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_private_key

DEFAULT_ISSUER = "https://login.example.com"
DEFAULT_AUDIENCE = "coupon-issuer"


def add_arguments(parser: Any) -> None:
    """The tools' shared flags (argparse or Locust's configargparse parser)."""
    parser.add_argument(
        "--jwt-key",
        default=os.environ.get("COUPON_JWT_KEY_FILE", ""),
        help="customers' JWT signing key: a PEM private key file, or for HS256 a file holding "
        "the secret (default: $COUPON_JWT_KEY_FILE); when set, every IssueCoupon carries a "
        "per-customer token",
    )
    parser.add_argument("--jwt-alg", default="RS256", help="JWT algorithm (RS256, ES256, HS256)")
    parser.add_argument("--jwt-issuer", default=DEFAULT_ISSUER, help="the tokens' iss")
    parser.add_argument("--jwt-audience", default=DEFAULT_AUDIENCE, help="the tokens' aud")


class Minter:
    """Signs one token per user id (remembered, so a user's repeat calls reuse its token)."""

    def __init__(
        self, key_file: str, algorithm: str, issuer: str, audience: str, ttl_s: int = 3600
    ) -> None:
        data = Path(key_file).read_bytes()
        # Loaded once: PyJWT given PEM bytes would parse (and for RSA check) them per token.
        self._key: Any = (
            data.strip() if algorithm.startswith("HS") else load_pem_private_key(data, None)
        )
        self._algorithm = algorithm
        self._issuer = issuer
        self._audience = audience
        self._ttl_s = ttl_s
        self._tokens: dict[str, str] = {}

    def token(self, user_id: str) -> str:
        token = self._tokens.get(user_id)
        if token is None:
            now = int(time.time())
            claims = {
                "sub": user_id,
                "iss": self._issuer,
                "aud": self._audience,
                "iat": now,
                "exp": now + self._ttl_s,
            }
            token = jwt.encode(claims, self._key, algorithm=self._algorithm)
            self._tokens[user_id] = token
        return token

    def headers(self, user_id: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user_id)}"}


def minter_from(args: argparse.Namespace) -> Minter | None:
    if not args.jwt_key:
        return None
    return Minter(args.jwt_key, args.jwt_alg, args.jwt_issuer, args.jwt_audience)


def main(argv: list[str] | None = None) -> int:
    """`python scripts/customer_tokens.py --jwt-key KEY USER`: print a token for USER (tests)."""
    parser = argparse.ArgumentParser(description="Print a customer's JWT (for testing).")
    add_arguments(parser)
    parser.add_argument("--ttl-s", type=int, default=3600, help="seconds until the token expires")
    parser.add_argument("user_id", help="the customer's user id (the token's sub)")
    args = parser.parse_args(argv)
    if not args.jwt_key:
        parser.error("--jwt-key (or $COUPON_JWT_KEY_FILE) is required")
    minter = Minter(args.jwt_key, args.jwt_alg, args.jwt_issuer, args.jwt_audience, args.ttl_s)
    print(minter.token(args.user_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
