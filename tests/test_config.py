from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from coupon.config import Config, ConfigError, load_config

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
