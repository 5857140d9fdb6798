"""`coupon-server --config FILE`: load the config and serve it with uvicorn."""

from __future__ import annotations

import argparse
import logging
import logging.config
import os
import resource
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from coupon.app import CONFIG_PATH_ENV
from coupon.auth import Authenticator, open_admin_refusal
from coupon.config import Config, ConfigError, load_config
from coupon.http_limits import limited_protocol
from coupon.logs import logging_config
from coupon.metrics import MULTIPROCESS_DIR_ENV
from coupon.webhooks import cli as webhooks_cli

if TYPE_CHECKING:
    from types import FrameType

log = logging.getLogger("coupon.server")

APP_FACTORY = "coupon.app:app_from_environment"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coupon-server", description="Run the coupon issuer.")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML config file; without it, built-in defaults (memory store, 127.0.0.1:8080)",
    )
    parser.add_argument(
        "--role",
        choices=("server", "webhooks"),
        default="server",
        help="server: serve the API (and deliver webhooks unless webhooks.deliver_in_server is "
        "false); webhooks: only deliver webhooks (PostgreSQL store)",
    )
    webhooks_cli.add_commands(parser)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        # Loads the customers' key now, so a bad key file stops start-up rather than every call.
        Authenticator(config.auth)
    except ConfigError as e:
        print(f"coupon-server: {e}", file=sys.stderr)
        return 2
    refusal = open_admin_refusal(config.server.host, config.auth)
    if refusal:
        print(f"coupon-server: {refusal}", file=sys.stderr)
        return 2
    log_config = logging_config(config.server.log_format, config.server.log_level)
    logging.config.dictConfig(log_config)
    webhooks_exit = webhooks_cli.run_if_asked(args, config)
    if webhooks_exit is not None:
        return webhooks_exit
    if not config.auth.has_api_keys:
        log.warning(
            "no API key is configured (auth.admin_token, auth.tokens): every method is open to "
            "anyone who can reach %s:%d",
            config.server.host,
            config.server.port,
        )
    metrics_dir = ""
    if config.server.workers > 1:
        # Each worker writes its metrics here so /metrics can sum them (see coupon.metrics).
        metrics_dir = tempfile.mkdtemp(prefix="coupon-metrics-")
        os.environ[MULTIPROCESS_DIR_ENV] = metrics_dir
    if args.config:
        # Worker processes re-read the same file (and the same environment overrides).
        os.environ[CONFIG_PATH_ENV] = str(Path(args.config).resolve())
    else:
        os.environ.pop(CONFIG_PATH_ENV, None)
    log.info(
        "starting: store=%s host=%s port=%d workers=%d engine=%s",
        config.store.type,
        config.server.host,
        config.server.port,
        config.server.workers,
        config.server.engine,
    )
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler
    # it found. Finding this one, a graceful stop exits 0, as service managers expect (and a
    # signal that arrives before uvicorn takes over still stops the process).
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, _exit_quietly)
    _raise_file_limit(config.server.max_connections)
    try:
        return _serve(config, log_config)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _serve(config: Config, log_config: dict[str, Any]) -> int:
    """Run the configured HTTP engine until it stops; its exit code."""
    options: dict[str, Any] = {
        "factory": True,
        "host": config.server.host,
        "port": config.server.port,
        "workers": config.server.workers,
        "access_log": config.server.access_log,
        "log_config": log_config,
        "timeout_graceful_shutdown": config.server.shutdown_timeout_s,
        "server_header": False,
        "http": limited_protocol(config.server.header_timeout_s, config.server.body_timeout_s),
        "limit_concurrency": config.server.max_connections,
        "timeout_keep_alive": config.server.keepalive_timeout_s,
    }
    if config.server.engine == "pyvoy":
        # Imported here: Envoy's module loads only for the engine that needs it.
        from coupon.pyvoy_server import serve

        return serve(config)
    if config.server.workers > 1:
        # What uvicorn.run does for several workers, with a supervisor that lets go of the
        # listening socket when it stops (see _ClosingMultiprocess).
        uvicorn_config = uvicorn.Config(APP_FACTORY, **options)
        sock = uvicorn_config.bind_socket()
        _ClosingMultiprocess(uvicorn_config, sockets=[sock]).run()
    else:
        uvicorn.run(APP_FACTORY, **options)
    return 0


class _ClosingMultiprocess(Multiprocess):
    """uvicorn's supervisor, closing its copy of the listening socket before stopping workers.

    Each worker closes its own copy when it starts a graceful stop, but uvicorn's supervisor
    keeps one open until it exits, so during the workers' shutdown the kernel still completed
    new connections into the backlog, where they hung until the supervisor exited and were
    then reset. With every copy closed, new connections are refused at once, as promised.
    """

    def terminate_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        super().terminate_all()


def _raise_file_limit(max_connections: int) -> None:
    """Lift the soft open-file limit to the hard one: each connection is a descriptor, and at
    a 1,024 default the process would stop accepting long before server.max_connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < max_connections + 100:
        log.warning(
            "open-file limit %d is close to server.max_connections %d: new connections may "
            "fail before the cap answers 503",
            soft,
            max_connections,
        )


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())
