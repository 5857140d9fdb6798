"""The Postgres store's SQL, read from the package's .sql files (one visible place for SQL)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

_NAME_LINE = re.compile(r"^-- name: (\w+)\s*$")
_MIGRATION_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")


def parse_query_file(text: str) -> dict[str, str]:
    """Split a file of `-- name: <name>` blocks into {name: sql}."""
    queries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = _NAME_LINE.match(line)
        if match:
            current = queries.setdefault(match.group(1), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines).strip() for name, lines in queries.items()}


@cache
def queries() -> dict[str, str]:
    text = files("coupon.store").joinpath("sql", "queries.sql").read_text(encoding="utf-8")
    return parse_query_file(text)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


@cache
def migrations() -> tuple[Migration, ...]:
    """Every migration file, in version order."""
    found = []
    for entry in files("coupon.store").joinpath("sql", "migrations").iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append(
                Migration(
                    int(match.group(1)),
                    match.group(2),
                    entry.read_text(encoding="utf-8"),
                )
            )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError("two migration files share a version number")
    return tuple(found)
