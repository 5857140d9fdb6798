"""Configuration: built-in defaults, then a YAML file, then COUPON_<SECTION>_<KEY> variables."""

from __future__ import annotations

import dataclasses
import os
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
    max_group_size: int = 256  # IssueCoupon calls of one campaign per transaction, at most
    start_margin_s: float = 2.0  # refuse "not started" without a query only this far ahead
    # The longest a call waits for the store, queue included; then `unavailable`.
    call_timeout_s: float = 5.0
    # Server-side session settings, sent as startup `options` when session_options is true
    # (set them per role instead behind a pooler that refuses `options`; docs/postgres.md).
    session_options: bool = True
    statement_timeout_s: float = 5.0
    lock_timeout_s: float = 2.0
    idle_in_transaction_timeout_s: float = 10.0
    # TCP keepalives and user timeout (client side, so they work behind a pooler too).
    keepalive_idle_s: int = 10
    keepalive_interval_s: int = 5
    keepalive_count: int = 3
    tcp_user_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class AuthConfig:
    admin_token: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_total: int = 10_000_000
    max_request_bytes: int = 64 * 1024


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)


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
    converter = {"int": _to_int, "float": _to_float, "bool": _to_bool}.get(type_name, _to_str)
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
