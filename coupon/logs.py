"""Logging set-up shared by the server and its worker processes (uvicorn applies it in each)."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

from coupon.caller import CallerFilter
from coupon.request_ids import RequestIdFilter


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
            "caller": getattr(record, "caller", "-"),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


_CONNINFO = re.compile(r"\s*\((?:host|user|dbname|database|port)=[^)]*\)")


class DriverDetailsFilter(logging.Filter):
    """Drops what the database driver's own log lines may carry: host, port and user.

    psycopg_pool warns with the driver's error ("connection to server at <host>, port <port>
    failed: ... role <user> ...") and with connection reprs "(host=... user=...)". The line
    keeps what happened, up to the first colon, without the details.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "psycopg" or record.name.startswith("psycopg."):
            message = _CONNINFO.sub("", record.getMessage())
            head, sep, _ = message.partition(": ")
            withheld = " (details withheld: they may name the host, port or user)"
            record.msg = head + withheld if sep else head
            record.args = ()
        return True


def logging_config(log_format: str, level: str) -> dict[str, Any]:
    """A logging.config.dictConfig for our loggers and uvicorn's."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter}
        if log_format == "json"
        else {
            "format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s %(caller)s] %(message)s"
        }
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "filters": {
            "request_id": {"()": RequestIdFilter},
            "caller": {"()": CallerFilter},
            "driver_details": {"()": DriverDetailsFilter},
        },
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["request_id", "caller", "driver_details"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": True},
        },
    }
