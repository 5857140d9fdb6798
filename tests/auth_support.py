"""Keys and tokens for auth tests: API keys as config entries, key pairs made on the spot."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from coupon.config import ApiKey, AuthConfig, JwtConfig

if TYPE_CHECKING:
    from pathlib import Path

ISSUER = "https://login.acme.test"
AUDIENCE = "coupon-issuer"

# name -> (token, role, brand); the config only ever sees the SHA-256.
KEYS = {
    "acme-checkout": ("tok-acme-checkout-7f3a", "checkout", "acme"),
    "acme-admin": ("tok-acme-admin-91c2", "admin", "acme"),
    "globex-admin": ("tok-globex-admin-44d0", "admin", "globex"),
    "ops": ("tok-ops-all-brands-0b6e", "admin", None),
}


def sha256_hex(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def api_keys() -> tuple[ApiKey, ...]:
    return tuple(
        ApiKey(name=name, sha256=sha256_hex(token), role=role, brand=brand)
        for name, (token, role, brand) in KEYS.items()
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass(frozen=True)
class KeyPair:
    algorithm: str
    private_pem: bytes
    public_pem: bytes
    # The key object signs: PyJWT given PEM bytes parses (and for RSA checks) them every time.
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    def write_public(self, directory: Path) -> Path:
        path = directory / f"{self.algorithm.lower()}-public.pem"
        path.write_bytes(self.public_pem)
        return path

    def token(self, sub: str | None, **claims: Any) -> str:
        """A token signed with this key: valid for an hour unless `claims` say otherwise."""
        now = int(time.time())
        body: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 3600}
        if sub is not None:
            body["sub"] = sub
        body.update(claims)
        return jwt.encode(body, self.private_key, algorithm=self.algorithm)


def rsa_pair() -> KeyPair:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _pair("RS256", private)


def ec_pair() -> KeyPair:
    return _pair("ES256", ec.generate_private_key(ec.SECP256R1()))


def _pair(algorithm: str, private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> KeyPair:
    return KeyPair(
        algorithm=algorithm,
        private_key=private,
        private_pem=private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        public_pem=private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


def jwt_config(
    public_key_file: Path, algorithms: tuple[str, ...] = ("RS256", "ES256")
) -> JwtConfig:
    return JwtConfig(
        algorithms=algorithms,
        issuer=ISSUER,
        audience=AUDIENCE,
        public_key_file=str(public_key_file),
        leeway_s=5,
    )


def locked_auth(customers: JwtConfig | None = None) -> AuthConfig:
    return AuthConfig(tokens=api_keys(), customers_jwt=customers)
