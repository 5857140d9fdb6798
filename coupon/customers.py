"""Customers' identity: a JWT from the brand's login system, verified here, names the user.

The key comes from the config (a PEM public key file, a JWKS file, or an HS256 secret in an
environment variable) and is loaded once at start-up, so a bad key stops the server there
instead of failing every call. Every token is checked for its signature, `exp`, `nbf`, issuer
and audience; the algorithm must be one the config lists AND one the key's type can verify,
so neither `alg: none` nor a public key used as an HMAC secret (algorithm confusion) passes.

A signature check costs tens of microseconds, a visible share of an IssueCoupon call, and a
customer retrying during a storm sends the same token again and again: verified tokens are
remembered (bounded, and only until their `exp`), so a retry costs a dictionary lookup.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from coupon.campaigns import parse_user_id
from coupon.config import ConfigError
from coupon.errors import InvalidArgument, Unauthenticated

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from coupon.config import JwtConfig

# Which algorithms each kind of key can verify.
_RSA = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC = frozenset({"ES256", "ES384", "ES512"})
_OKP = frozenset({"EdDSA"})
_HMAC = frozenset({"HS256", "HS384", "HS512"})
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_FAMILY_BY_JWK_TYPE = {"RSA": _RSA, "EC": _EC, "OKP": _OKP}

CACHE_SIZE = 20_000  # verified tokens remembered, at most (under 1 KiB each)
_REQUIRED_CLAIMS = ["exp", "iss", "aud", "sub"]


class _Key:
    """One verification key and the algorithms it may be used with."""

    def __init__(self, key: Any, algorithms: list[str]) -> None:
        self.key = key
        self.algorithms = algorithms


class CustomerTokens:
    """Verifies customers' JWTs; `user_id(token)` is the verified `sub`."""

    def __init__(
        self,
        config: JwtConfig,
        environ: Mapping[str, str],
        now: Callable[[], float] = time.time,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self._config = config
        self._now = now
        self._cache_size = cache_size
        self._verified: dict[str, tuple[str, float]] = {}  # token -> (sub, exp)
        self._single: _Key | None = None
        self._by_kid: dict[str, _Key] = {}
        if config.public_key_file:
            self._single = _public_key_file(config)
        elif config.jwks_file:
            self._by_kid = _jwks_file(config)
            if len(self._by_kid) == 1:
                self._single = next(iter(self._by_kid.values()))
        else:
            self._single = _hmac_secret(config, environ)

    def user_id(self, token: str) -> str:
        """The verified `sub` of `token`; raises Unauthenticated for any token not fully valid."""
        remembered = self._verified.get(token)
        if remembered is not None:
            sub, exp = remembered
            if self._now() < exp + self._config.leeway_s:
                return sub
            del self._verified[token]
            raise Unauthenticated("the customer token has expired")
        claims = self._decode(token)
        sub = claims["sub"]
        try:
            user_id = parse_user_id(sub) if isinstance(sub, str) else None
        except InvalidArgument:
            user_id = None
        if user_id is None:
            raise Unauthenticated("the customer token's sub is not a usable user id")
        exp = claims["exp"]
        if isinstance(exp, (int, float)):
            if len(self._verified) >= self._cache_size:
                # The oldest entry goes first (dicts keep insertion order).
                del self._verified[next(iter(self._verified))]
            self._verified[token] = (user_id, float(exp))
        return user_id

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            key = self._key_for(token)
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=key.algorithms,
                audience=self._config.audience,
                issuer=self._config.issuer,
                leeway=self._config.leeway_s,
                options={"require": _REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the customer token has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("the customer token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("the customer token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("the customer token is from another issuer") from None
        except jwt.MissingRequiredClaimError as e:
            raise Unauthenticated(f"the customer token has no {e.claim} claim") from None
        except jwt.InvalidAlgorithmError:
            raise Unauthenticated("the customer token's algorithm is not accepted") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            # Forged, tampered, malformed: the client learns no more than that.
            raise Unauthenticated("the customer token is not valid") from None
        return claims

    def _key_for(self, token: str) -> _Key:
        if not self._by_kid:
            assert self._single is not None
            return self._single
        kid = jwt.get_unverified_header(token).get("kid")
        if isinstance(kid, str) and kid in self._by_kid:
            return self._by_kid[kid]
        if kid is None and self._single is not None:
            return self._single
        raise jwt.InvalidTokenError("unknown kid")


def _public_key_file(config: JwtConfig) -> _Key:
    where = "auth.customers.jwt.public_key_file"
    try:
        data = Path(config.public_key_file).read_bytes()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {config.public_key_file}: {e.strerror}") from None
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ConfigError(
            f"{where}: {config.public_key_file} does not hold a PEM public key "
            "(-----BEGIN PUBLIC KEY-----)"
        ) from None
    if isinstance(key, rsa.RSAPublicKey):
        family, kind = _RSA, "an RSA"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        # Each ES algorithm is bound to one curve (ES256: P-256 ...).
        family = frozenset(a for a, curve in _EC_CURVES.items() if curve == key.curve.name)
        kind = f"an EC ({key.curve.name})"
    elif isinstance(key, ed25519.Ed25519PublicKey):
        family, kind = _OKP, "an Ed25519"
    else:
        raise ConfigError(f"{where}: the key type of {config.public_key_file} is not supported")
    return _Key(key, _usable(config, family, f"{where} holds {kind} key"))


def _jwks_file(config: JwtConfig) -> dict[str, _Key]:
    where = "auth.customers.jwt.jwks_file"
    try:
        data = json.loads(Path(config.jwks_file).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {config.jwks_file}: {e.strerror}") from None
    except ValueError:
        raise ConfigError(f"{where}: {config.jwks_file} is not JSON") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f'{where}: {config.jwks_file} has no "keys" list')
    keys: dict[str, _Key] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: keys[{index}] is not an object")
        family = _FAMILY_BY_JWK_TYPE.get(str(entry.get("kty")))
        if family is None:
            # A symmetric ("oct") key in a key set meant for public keys is refused outright.
            raise ConfigError(
                f"{where}: keys[{index}] has kty {entry.get('kty')!r}; use RSA, EC or OKP"
            )
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWKError as e:
            raise ConfigError(f"{where}: keys[{index}] is not a usable key: {e}") from None
        kid = str(entry.get("kid") or f"#{index}")
        if kid in keys:
            raise ConfigError(f"{where}: the kid {kid!r} appears twice")
        usable = _usable(config, family, f"{where}: keys[{index}] ({entry.get('kty')})")
        declared = entry.get("alg")
        if declared is not None:
            usable = [a for a in usable if a == declared]
            if not usable:
                raise ConfigError(f"{where}: keys[{index}] is for {declared}, not in algorithms")
        keys[kid] = _Key(jwk.key, usable)
    return keys


def _hmac_secret(config: JwtConfig, environ: Mapping[str, str]) -> _Key:
    name = config.hs256_secret_env
    secret = environ.get(name, "")
    if len(secret.encode()) < 32:
        # The secret itself is never printed; only the variable's name.
        raise ConfigError(
            f"auth.customers.jwt.hs256_secret_env: the environment variable {name} must hold "
            "a secret of at least 32 bytes"
        )
    return _Key(secret.encode(), [a for a in config.algorithms if a in _HMAC])


def _usable(config: JwtConfig, family: frozenset[str], what: str) -> list[str]:
    usable = [a for a in config.algorithms if a in family]
    if not usable:
        raise ConfigError(
            f"{what}, which verifies none of auth.customers.jwt.algorithms "
            f"({', '.join(config.algorithms)}); it needs one of {', '.join(sorted(family))}"
        )
    return usable
