"""Configuration: built-in defaults, then a YAML file, then COUPON_<SECTION>_<KEY> variables."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

if TYPE_CHECKING:
    from collections.abc import Mapping

N = TypeVar("N", int, float)

STORE_TYPES = ("memory", "postgres")
LOG_FORMATS = ("text", "json")
ENGINES = ("uvicorn", "pyvoy")  # pyvoy: HTTP/2 and native gRPC as well (coupon/pyvoy_server.py)
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    access_log: bool = False  # costs ~25% throughput under load; off unless asked for
    log_format: str = "text"
    log_level: str = "info"
    shutdown_timeout_s: int = 20
    engine: str = "uvicorn"
    # Limits per worker process (uvicorn has no header or body timeout of its own).
    header_timeout_s: float = 10.0  # from connect (or the previous answer) to the request's headers
    body_timeout_s: float = 10.0  # from the headers to the request's last body byte
    keepalive_timeout_s: int = 5  # an idle kept-alive connection is closed after this
    max_connections: int = 2048  # open connections (and calls) per worker; more get HTTP 503


@dataclass(frozen=True, slots=True)
class StoreConfig:
    type: str = "memory"


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    dsn: str = field(default="", repr=False)  # may hold a password: never printed
    pool_min_size: int = 2
    pool_max_size: int = 10
    connect_timeout_s: int = 5
    # After a failed connection attempt the pool tries once more this much later, then frees
    # the slot so that the next call starts a fresh attempt: after a failover or a restart the
    # service reconnects within about this long of the database accepting writes again.
    reconnect_timeout_s: float = 0.5
    max_group_size: int = 256  # IssueCoupon calls of one campaign per transaction, at most
    start_margin_s: float = 2.0  # refuse "not started" without a query only this far ahead
    # The longest a call waits for the store, queue included; then `unavailable`.
    call_timeout_s: float = 5.0
    # Server-side session settings, sent as startup `options` when session_options is true
    # (set them per role instead behind a pooler that refuses `options`; docs/postgres.md).
    session_options: bool = True
    statement_timeout_s: float = 5.0
    # As long as a call's own bound: waiting behind another group's commit for the campaign's
    # row lock is normal (longer with a synchronous standby), and must not fail a call sooner
    # than call_timeout_s would.
    lock_timeout_s: float = 5.0
    idle_in_transaction_timeout_s: float = 10.0
    # TCP keepalives and user timeout (client side, so they work behind a pooler too).
    keepalive_idle_s: int = 10
    keepalive_interval_s: int = 5
    keepalive_count: int = 3
    tcp_user_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A named bearer token, kept only as the SHA-256 of the token (lowercase hex)."""

    name: str
    sha256: str = field(repr=False)
    role: str
    brand: str | None = None  # None: every brand


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """How customers' JWTs are verified (exactly one key source is set)."""

    algorithms: tuple[str, ...]
    issuer: str
    audience: str
    public_key_file: str = ""
    jwks_file: str = ""
    hs256_secret_env: str = ""  # the NAME of the variable holding the secret, not the secret
    leeway_s: int = 30


@dataclass(frozen=True, slots=True)
class AuthConfig:
    admin_token: str = field(default="", repr=False)
    tokens: tuple[ApiKey, ...] = ()
    customers_jwt: JwtConfig | None = None  # auth.customers.jwt
    allow_open_admin: bool = False

    @property
    def has_api_keys(self) -> bool:
        """Whether any key is configured; without one, the non-public methods are open."""
        return bool(self.admin_token or self.tokens)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_total: int = 10_000_000
    max_request_bytes: int = 64 * 1024


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    url: str
    secret: str = field(repr=False)  # signs every POST: never printed
    brand: str = ""  # "": every brand


@dataclass(frozen=True, slots=True)
class WebhooksConfig:
    endpoints: tuple[WebhookEndpoint, ...] = ()
    deliver_in_server: bool = True  # false: only `coupon-server --role webhooks` delivers
    max_attempts: int = 12  # then the batch is dead-lettered (listed and retried by hand)
    retry_initial_s: float = 1.0
    retry_max_s: float = 600.0
    timeout_s: float = 10.0  # every POST, connect to last byte
    concurrency: int = 4  # POSTs in flight per delivering process
    stalled_after_s: float = 30.0  # a batch held by a process silent this long is retried
    poll_interval_s: float = 2.0


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)


def load_config(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file (None: built-in defaults) and apply environment overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        values = loaded or {}
    config = _build(values, os.environ if environ is None else environ)
    _check(config)
    return config


def _build(values: dict[str, Any], environ: Mapping[str, str]) -> Config:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    unknown = set(values) - set(sections)
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(map(str, unknown)))}")
    built: dict[str, Any] = {}
    for name, section_field in sections.items():
        section_type = section_field.default_factory
        raw = values.get(name) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config section '{name}' must be a mapping")
        built[name] = _build_section(name, section_type, raw, environ)
    return Config(**built)


def _build_section(
    section: str, section_type: Any, raw: dict[str, Any], environ: Mapping[str, str]
) -> Any:
    if section == "auth":
        return _build_auth(raw, environ)
    keys = {f.name: f for f in dataclasses.fields(section_type)}
    unknown = set(raw) - set(keys)
    if unknown:
        raise ConfigError(f"unknown key(s) in '{section}': {', '.join(sorted(map(str, unknown)))}")
    kwargs: dict[str, Any] = {}
    for key, key_field in keys.items():
        env_name = f"COUPON_{section}_{key}".upper()
        if env_name in environ:
            kwargs[key] = _convert(f"{env_name}", environ[env_name], key_field.type)
        elif key in raw:
            kwargs[key] = _convert(f"{section}.{key}", raw[key], key_field.type)
    return section_type(**kwargs)


def _convert(where: str, value: Any, type_name: Any) -> Any:
    converter = {
        "int": _to_int,
        "float": _to_float,
        "bool": _to_bool,
        "tuple[WebhookEndpoint, ...]": _to_endpoints,
    }.get(type_name, _to_str)
    return converter(where, value)


def _to_int(where: str, value: Any) -> int:
    return _to_number(where, value, int, "a whole number")


def _to_float(where: str, value: Any) -> float:
    return _to_number(where, value, float, "a number")


def _to_number(where: str, value: Any, number_type: type[N], what: str) -> N:
    # YAML's true/false would otherwise pass as 1/0.
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be {what}")
    try:
        return number_type(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be {what}, got {value!r}") from None


def _to_bool(where: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{where} must be true or false, got {value!r}")


def _to_str(where: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, (str, int, float)):
        raise ConfigError(f"{where} must be a string")
    return str(value)


def _to_endpoints(where: str, value: Any) -> tuple[WebhookEndpoint, ...]:
    """A list of {url, secret, brand?}; from the environment, the same list as YAML text."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{where} must be a YAML list of {{url, secret, brand}}") from None
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of {{url, secret, brand}}")
    endpoints = []
    for index, item in enumerate(value):
        here = f"{where}[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{here} must be a mapping with url and secret")
        unknown = set(item) - {"url", "secret", "brand"}
        if unknown:
            raise ConfigError(f"unknown key(s) in {here}: {', '.join(sorted(map(str, unknown)))}")
        url = _to_str(f"{here}.url", item.get("url"))
        if not _WEBHOOK_URL.fullmatch(url):
            raise ConfigError(f"{here}.url must be an http:// or https:// URL with a host")
        # The value itself is never echoed: it is a secret.
        secret = item.get("secret")
        if not isinstance(secret, str) or len(secret) < 16:
            raise ConfigError(f"{here}.secret must be a string of at least 16 characters")
        brand = _to_str(f"{here}.brand", item.get("brand"))
        endpoints.append(WebhookEndpoint(url=url, secret=secret, brand=brand))
    urls = [e.url for e in endpoints]
    if len(set(urls)) != len(urls):
        raise ConfigError(f"{where}: each url may appear once")
    return tuple(endpoints)


_WEBHOOK_URL = re.compile(r"https?://[^/\s?#]+(?:[/?#]\S*)?")


def _check(config: Config) -> None:
    if config.store.type not in STORE_TYPES:
        raise ConfigError(
            f"store.type must be one of {', '.join(STORE_TYPES)}, got {config.store.type!r}"
        )
    if config.server.log_format not in LOG_FORMATS:
        raise ConfigError(f"server.log_format must be one of {', '.join(LOG_FORMATS)}")
    if not 0 <= config.server.port <= 65535:
        raise ConfigError("server.port must be between 0 and 65535")
    if config.server.workers < 1:
        raise ConfigError("server.workers must be at least 1")
    if config.server.engine not in ENGINES:
        raise ConfigError(f"server.engine must be one of {', '.join(ENGINES)}")
    if config.server.engine == "pyvoy" and config.server.workers > 1 and config.server.port == 0:
        # Each Envoy process would pick a port of its own.
        raise ConfigError("server.engine pyvoy with server.workers > 1 needs a server.port")
    if config.server.workers > 1 and config.store.type == "memory":
        raise ConfigError(
            "server.workers > 1 needs store.type: postgres; the memory store lives inside one "
            "process, so several workers would each sell the campaign's coupons again"
        )
    if config.store.type == "postgres" and not config.database.dsn:
        raise ConfigError("store.type postgres needs database.dsn (or COUPON_DATABASE_DSN)")
    if config.limits.max_total < 1 or config.limits.max_total > 2**31 - 1:
        raise ConfigError("limits.max_total must be between 1 and 2147483647")
    if config.limits.max_request_bytes < 1024:
        raise ConfigError("limits.max_request_bytes must be at least 1024")
    _check_ranges(config)
    if (
        config.database.pool_min_size < 1
        or config.database.pool_max_size < config.database.pool_min_size
    ):
        raise ConfigError("database.pool_min_size must be >= 1 and <= database.pool_max_size")
    _check_webhooks(config.webhooks)
    if config.store.type == "memory" and not config.webhooks.deliver_in_server:
        raise ConfigError(
            "webhooks.deliver_in_server: false needs store.type: postgres; the memory store's "
            "events live in the server process, so only it can deliver them"
        )


def _check_webhooks(webhooks: WebhooksConfig) -> None:
    if webhooks.max_attempts < 1:
        raise ConfigError("webhooks.max_attempts must be at least 1")
    if not 0 < webhooks.retry_initial_s <= webhooks.retry_max_s:
        raise ConfigError("webhooks.retry_initial_s must be > 0 and <= webhooks.retry_max_s")
    for key in ("timeout_s", "stalled_after_s", "poll_interval_s"):
        if getattr(webhooks, key) <= 0:
            raise ConfigError(f"webhooks.{key} must be greater than 0")
    if webhooks.concurrency < 1:
        raise ConfigError("webhooks.concurrency must be at least 1")


def _check_ranges(config: Config) -> None:
    """Refuse values that would make the service misbehave, naming the key."""
    if config.server.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"server.log_level must be one of {', '.join(LOG_LEVELS)}")
    server, db = config.server, config.database
    # (key, value, lowest allowed, highest allowed, lowest excluded)
    ranges: list[tuple[str, float, float, float, bool]] = [
        ("server.shutdown_timeout_s", server.shutdown_timeout_s, 0, 3600, False),
        ("server.header_timeout_s", server.header_timeout_s, 0, 3600, True),
        ("server.body_timeout_s", server.body_timeout_s, 0, 3600, True),
        ("server.keepalive_timeout_s", server.keepalive_timeout_s, 1, 3600, False),
        ("server.max_connections", server.max_connections, 1, 1_000_000, False),
        ("database.connect_timeout_s", db.connect_timeout_s, 1, 600, False),
        ("database.max_group_size", db.max_group_size, 1, 10_000, False),
        ("database.start_margin_s", db.start_margin_s, 0, 3600, False),
        ("database.call_timeout_s", db.call_timeout_s, 0, 600, True),
        ("database.reconnect_timeout_s", db.reconnect_timeout_s, 0, 300, True),
        ("database.statement_timeout_s", db.statement_timeout_s, 0, 3600, False),
        ("database.lock_timeout_s", db.lock_timeout_s, 0, 3600, False),
        (
            "database.idle_in_transaction_timeout_s",
            db.idle_in_transaction_timeout_s,
            0,
            3600,
            False,
        ),
        ("database.keepalive_idle_s", db.keepalive_idle_s, 1, 3600, False),
        ("database.keepalive_interval_s", db.keepalive_interval_s, 1, 3600, False),
        ("database.keepalive_count", db.keepalive_count, 1, 100, False),
        ("database.tcp_user_timeout_s", db.tcp_user_timeout_s, 0, 3600, False),
    ]
    for key, value, low, high, low_excluded in ranges:
        # `not (a <= v)` also refuses NaN, which passes every comparison as false.
        if low_excluded:
            if not (low < value <= high):
                raise ConfigError(f"{key} must be greater than {low:g} and at most {high:g}")
        elif not (low <= value <= high):
            raise ConfigError(f"{key} must be between {low:g} and {high:g}")


# --- auth: the one section with nested values (named keys, the customers' JWT settings) ---

ROLES = ("admin", "checkout")
AUTH_KEYS = ("admin_token", "tokens", "customers", "allow_open_admin")
# Asymmetric algorithms take a public key (file or JWKS); HMAC ones a shared secret. "none" is
# never accepted, and the two families are never mixed: a public key used as an HMAC secret is
# the classic algorithm-confusion forgery.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
MAX_LEEWAY_S = 300
MIN_HMAC_SECRET_BYTES = 32
_HEX_DIGITS = frozenset("0123456789abcdef")
_JWT_KEYS = (
    "algorithms",
    "issuer",
    "audience",
    "public_key_file",
    "jwks_file",
    "hs256_secret_env",
    "leeway_s",
)


def _build_auth(raw: dict[str, Any], environ: Mapping[str, str]) -> AuthConfig:
    unknown = set(raw) - set(AUTH_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) in 'auth': {', '.join(sorted(map(str, unknown)))}")
    values = dict(raw)
    for key in AUTH_KEYS:
        env_name = f"COUPON_AUTH_{key}".upper()
        if env_name in environ:
            text = environ[env_name]
            # Nested values come from the environment as YAML text (a list, a mapping).
            values[key] = (
                text if key in ("admin_token", "allow_open_admin") else _yaml(env_name, text)
            )
    admin_token = _to_str("auth.admin_token", values.get("admin_token"))
    tokens = _api_keys(values.get("tokens"))
    if admin_token:
        digest = hashlib.sha256(admin_token.encode()).hexdigest()
        if any(key.sha256 == digest for key in tokens):
            raise ConfigError("auth.admin_token is also listed in auth.tokens; keep one of them")
        if any(key.name == SHORTHAND_KEY_NAME for key in tokens):
            raise ConfigError(
                f"auth.tokens: the name {SHORTHAND_KEY_NAME!r} is taken by auth.admin_token"
            )
    return AuthConfig(
        admin_token=admin_token,
        tokens=tokens,
        customers_jwt=_customers(values.get("customers")),
        allow_open_admin=_to_bool("auth.allow_open_admin", values.get("allow_open_admin", False)),
    )


# The name auth.admin_token goes by in logs and metrics.
SHORTHAND_KEY_NAME = "admin_token"


def _yaml(where: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{where} is not valid YAML") from None


def _api_keys(raw: Any) -> tuple[ApiKey, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("auth.tokens must be a list of {name, sha256, role, brand}")
    keys: list[ApiKey] = []
    for index, entry in enumerate(raw):
        where = f"auth.tokens[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping of name, sha256, role, brand")
        unknown = set(entry) - {"name", "sha256", "role", "brand"}
        if unknown:
            raise ConfigError(f"unknown key(s) in {where}: {', '.join(sorted(map(str, unknown)))}")
        name = _to_str(f"{where}.name", entry.get("name")).strip()
        if not name:
            raise ConfigError(f"{where}.name is required")
        where = f"auth.tokens[{index}] ({name})"
        digest = _to_str(f"{where}.sha256", entry.get("sha256")).strip().lower()
        if len(digest) != 64 or not set(digest) <= _HEX_DIGITS:
            # The value itself is not echoed: a token pasted here by mistake must not be logged.
            raise ConfigError(
                f"{where}.sha256 must be 64 hexadecimal characters (the SHA-256 of the token, "
                "not the token)"
            )
        role = _to_str(f"{where}.role", entry.get("role"))
        if role not in ROLES:
            raise ConfigError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        brand = _to_str(f"{where}.brand", entry.get("brand")).strip() or None
        for other in keys:
            if other.name == name:
                raise ConfigError(f"auth.tokens: the name {name!r} is used twice")
            if other.sha256 == digest:
                raise ConfigError(f"auth.tokens: {other.name!r} and {name!r} have the same sha256")
        keys.append(ApiKey(name=name, sha256=digest, role=role, brand=brand))
    return tuple(keys)


def _customers(raw: Any) -> JwtConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError("auth.customers must be a mapping with the key jwt")
    unknown = set(raw) - {"jwt"}
    if unknown:
        raise ConfigError(
            f"unknown key(s) in 'auth.customers': {', '.join(sorted(map(str, unknown)))}"
        )
    jwt = raw.get("jwt")
    if not isinstance(jwt, dict):
        raise ConfigError("auth.customers.jwt must be a mapping")
    return _jwt_config(jwt)


def _jwt_config(raw: dict[str, Any]) -> JwtConfig:
    where = "auth.customers.jwt"
    unknown = set(raw) - set(_JWT_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) in '{where}': {', '.join(sorted(map(str, unknown)))}")
    algorithms = raw.get("algorithms")
    if not isinstance(algorithms, list) or not algorithms:
        raise ConfigError(f"{where}.algorithms must be a non-empty list, such as [RS256, ES256]")
    names = tuple(_to_str(f"{where}.algorithms", a) for a in algorithms)
    for name in names:
        if name.lower() == "none":
            raise ConfigError(f"{where}.algorithms must not contain 'none' (unsigned tokens)")
        if name not in ASYMMETRIC_ALGORITHMS | HMAC_ALGORITHMS:
            allowed = ", ".join(sorted(ASYMMETRIC_ALGORITHMS | HMAC_ALGORITHMS))
            raise ConfigError(f"{where}.algorithms: {name!r} is not one of {allowed}")
    config = JwtConfig(
        algorithms=names,
        issuer=_to_str(f"{where}.issuer", raw.get("issuer")).strip(),
        audience=_to_str(f"{where}.audience", raw.get("audience")).strip(),
        public_key_file=_to_str(f"{where}.public_key_file", raw.get("public_key_file")),
        jwks_file=_to_str(f"{where}.jwks_file", raw.get("jwks_file")),
        hs256_secret_env=_to_str(f"{where}.hs256_secret_env", raw.get("hs256_secret_env")),
        leeway_s=_to_int(f"{where}.leeway_s", raw.get("leeway_s", 30)),
    )
    if not config.issuer or not config.audience:
        raise ConfigError(
            f"{where} needs issuer and audience (every token is checked against both)"
        )
    if not 0 <= config.leeway_s <= MAX_LEEWAY_S:
        raise ConfigError(f"{where}.leeway_s must be between 0 and {MAX_LEEWAY_S}")
    sources = [
        s for s in ("public_key_file", "jwks_file", "hs256_secret_env") if getattr(config, s)
    ]
    if len(sources) != 1:
        raise ConfigError(
            f"{where} needs exactly one of public_key_file, jwks_file, hs256_secret_env"
        )
    hmac_names = set(names) & HMAC_ALGORITHMS
    if config.hs256_secret_env:
        if hmac_names != set(names):
            raise ConfigError(
                f"{where}: hs256_secret_env verifies HS256/HS384/HS512 only; remove the other "
                "algorithms or use a public key"
            )
    elif hmac_names:
        raise ConfigError(
            f"{where}: {', '.join(sorted(hmac_names))} with a public key would let anyone who "
            "has the public key sign tokens (algorithm confusion); use hs256_secret_env for HMAC"
        )
    return config
