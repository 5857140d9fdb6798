from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from coupon.auth import open_admin_refusal
from coupon.config import AuthConfig, Config, ConfigError, load_config

if TYPE_CHECKING:
    from pathlib import Path

ROOT_CONFIG = "configs/config.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_no_file_means_built_in_defaults() -> None:
    config = load_config(None, environ={})
    assert config == Config()
    assert (config.server.host, config.server.port, config.store.type) == (
        "127.0.0.1",
        8080,
        "memory",
    )


def test_the_shipped_config_runs_the_memory_store() -> None:
    config = load_config(ROOT_CONFIG, environ={})
    assert config.store.type == "memory"
    assert config.server.workers == 1


def test_yaml_values_then_environment_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "server: {port: 9000, workers: 2}\nstore: {type: postgres}\n"
        "database: {dsn: 'postgresql://a@b/c'}\nlimits: {max_total: 50}\n",
    )
    config = load_config(
        path, environ={"COUPON_SERVER_PORT": "9100", "COUPON_DATABASE_DSN": "postgresql://x@y/z"}
    )
    assert config.server.port == 9100
    assert config.server.workers == 2
    assert config.database.dsn == "postgresql://x@y/z"
    assert config.limits.max_total == 50


def test_a_missing_file_is_an_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_config(missing, environ={})


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        ("store: {type: redis}", {}, "store.type"),
        ("server: {prot: 1}", {}, "prot"),
        ("serverz: {}", {}, "serverz"),
        ("server: {port: eighty}", {}, "server.port"),
        ("server: {workers: 0}", {}, "workers"),
        ("server: {workers: 2}", {}, "memory store"),
        ("", {"COUPON_SERVER_WORKERS": "4"}, "memory store"),
        ("store: {type: postgres}", {}, "database.dsn"),
        ("limits: {max_total: 0}", {}, "max_total"),
        ("database: {reconnect_timeout_s: 0}", {}, "database.reconnect_timeout_s"),
        ("", {"COUPON_DATABASE_RECONNECT_TIMEOUT_S": "soon"}, "RECONNECT_TIMEOUT_S"),
        ("- a list", {}, "mapping"),
        ("server: [1]", {}, "mapping"),
        ("server: {access_log: maybe}", {}, "true or false"),
        ("{{{", {}, "not valid YAML"),
        ("server: {engine: hypercorn}", {}, "server.engine"),
        (
            "server: {engine: pyvoy, workers: 2, port: 0}\nstore: {type: postgres}\n"
            "database: {dsn: 'postgresql://a@b/c'}",
            {},
            "needs a server.port",
        ),
    ],
)
def test_bad_config_is_refused_with_a_clear_message(
    tmp_path: Path, text: str, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), environ=environ)


def test_the_dsn_never_shows_in_the_config_repr(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "store: {type: postgres}\ndatabase: {dsn: 'postgresql://u:hunter2@h/d'}\n"
        "auth: {admin_token: s3cret}\n",
    )
    text = repr(load_config(path, environ={}))
    assert "hunter2" not in text
    assert "s3cret" not in text


def test_the_engine_is_uvicorn_unless_pyvoy_is_asked_for(tmp_path: Path) -> None:
    assert load_config(None, environ={}).server.engine == "uvicorn"
    path = write(tmp_path, "server: {engine: pyvoy}")
    assert load_config(path, environ={}).server.engine == "pyvoy"
    assert load_config(None, environ={"COUPON_SERVER_ENGINE": "pyvoy"}).server.engine == "pyvoy"


# --- auth: named keys and customers' JWTs ---

DIGEST = "ab" * 32
JWT = "{algorithms: [RS256], public_key_file: k.pem, issuer: i, audience: a"


def test_auth_keys_and_customer_jwt_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
auth:
  tokens:
    - {{name: ops, sha256: "{DIGEST.upper()}", role: admin}}
    - {{name: acme-checkout, sha256: "{"cd" * 32}", role: checkout, brand: acme}}
  customers:
    jwt: {JWT}, leeway_s: 10}}
  allow_open_admin: true
""",
    )
    auth = load_config(path, environ={}).auth
    assert [(k.name, k.sha256, k.role, k.brand) for k in auth.tokens] == [
        ("ops", DIGEST, "admin", None),
        ("acme-checkout", "cd" * 32, "checkout", "acme"),
    ]
    assert auth.customers_jwt is not None
    assert (auth.customers_jwt.algorithms, auth.customers_jwt.leeway_s) == (("RS256",), 10)
    assert auth.allow_open_admin
    assert auth.has_api_keys


def test_auth_values_come_from_the_environment_too() -> None:
    environ = {
        "COUPON_AUTH_ADMIN_TOKEN": "s3cret",
        "COUPON_AUTH_TOKENS": f"[{{name: ci, sha256: '{DIGEST}', role: checkout}}]",
        "COUPON_AUTH_ALLOW_OPEN_ADMIN": "yes",
    }
    auth = load_config(None, environ=environ).auth
    assert auth.admin_token == "s3cret"
    assert [k.name for k in auth.tokens] == ["ci"]
    assert auth.allow_open_admin


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ("{tokens: {name: x}}", "auth.tokens must be a list"),
        ("{tokens: [x]}", r"auth.tokens\[0\] must be a mapping"),
        (f"{{tokens: [{{sha256: '{DIGEST}', role: admin}}]}}", r"auth.tokens\[0\].name"),
        ("{tokens: [{name: a, sha256: 'not-hex', role: admin}]}", "64 hexadecimal"),
        (f"{{tokens: [{{name: a, sha256: '{DIGEST}0', role: admin}}]}}", "64 hexadecimal"),
        (f"{{tokens: [{{name: a, sha256: '{DIGEST}', role: root}}]}}", "role must be one of"),
        (f"{{tokens: [{{name: a, sha256: '{DIGEST}', role: admin, scope: x}}]}}", "scope"),
        (
            f"{{tokens: [{{name: a, sha256: '{DIGEST}', role: admin}},"
            f" {{name: a, sha256: '{'cd' * 32}', role: admin}}]}}",
            "used twice",
        ),
        (
            f"{{tokens: [{{name: a, sha256: '{DIGEST}', role: admin}},"
            f" {{name: b, sha256: '{DIGEST}', role: admin}}]}}",
            "same sha256",
        ),
        ("{customers: {jwt: {algorithms: [none], hs256_secret_env: S}}}", "'none'"),
        (f"{{customers: {{jwt: {JWT.replace('RS256', 'XS999')}}}}}}}", "XS999"),
        (f"{{customers: {{jwt: {JWT.replace('RS256', 'RS256, HS256')}}}}}}}", "confusion"),
        (f"{{customers: {{jwt: {JWT}, leeway_s: 3600}}}}}}", "leeway_s"),
        (f"{{customers: {{jwt: {JWT}, jwks_file: j.json}}}}}}", "exactly one of"),
        ("{customers: {jwt: {algorithms: [RS256], public_key_file: k, issuer: i}}}", "audience"),
        (
            "{customers: {jwt: {algorithms: [RS256, HS256], hs256_secret_env: S,"
            " issuer: i, audience: a}}}",
            "HS256/HS384/HS512 only",
        ),
        ("{customers: {oidc: {}}}", "oidc"),
        ("{customers: {jwt: {}}}", "algorithms"),
        ("{allow_open_admin: perhaps}", "true or false"),
        ("{admin_tokens: x}", "admin_tokens"),
    ],
)
def test_bad_auth_config_is_refused_with_a_clear_message(
    tmp_path: Path, auth: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, f"auth: {auth}\n"), environ={})


def test_a_token_pasted_in_place_of_its_digest_is_not_echoed(tmp_path: Path) -> None:
    path = write(tmp_path, "auth: {tokens: [{name: a, sha256: my-real-token, role: admin}]}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, environ={})
    assert "my-real-token" not in str(refused.value)


def test_the_shipped_postgres_config_starts_only_with_an_admin_key() -> None:
    dsn = {"COUPON_DATABASE_DSN": "postgresql://x"}
    config = load_config("configs/postgres.yaml", environ=dsn)
    refusal = open_admin_refusal(config.server.host, config.auth)
    assert refusal is not None
    assert "COUPON_AUTH_ADMIN_TOKEN" in refusal
    keyed = load_config("configs/postgres.yaml", environ={**dsn, "COUPON_AUTH_ADMIN_TOKEN": "k"})
    assert open_admin_refusal(keyed.server.host, keyed.auth) is None


@pytest.mark.parametrize(
    ("host", "auth", "refused"),
    [
        ("127.0.0.1", AuthConfig(), False),
        ("127.0.0.5", AuthConfig(), False),
        ("::1", AuthConfig(), False),
        ("localhost", AuthConfig(), False),
        ("0.0.0.0", AuthConfig(), True),
        ("::", AuthConfig(), True),
        ("10.1.2.3", AuthConfig(), True),
        ("coupon.internal", AuthConfig(), True),
        ("0.0.0.0", AuthConfig(allow_open_admin=True), False),
        ("0.0.0.0", AuthConfig(admin_token="k"), False),
    ],
)
def test_an_open_admin_beyond_loopback_is_refused(
    host: str, auth: AuthConfig, refused: bool
) -> None:
    assert (open_admin_refusal(host, auth) is not None) == refused
