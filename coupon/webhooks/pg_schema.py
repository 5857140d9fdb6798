"""procrastinate's schema, applied with our migrations: same transaction, same advisory lock.

procrastinate documents two ways to install its schema: `procrastinate schema --apply` (its own
command) or applying `SchemaManager.get_schema()` yourself. The second runs here, inside
coupon.store.migrations' transaction, so several processes starting at once install it exactly
once, and a database never holds our tables without the outbox's. The table is marked with the
procrastinate version that installed it; procrastinate is pinned exactly, and an upgrade must
apply procrastinate's own migration files between the two versions (its documented way).
"""

from __future__ import annotations

import logging
from functools import cache
from importlib.metadata import version
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from procrastinate.schema import SchemaManager
from psycopg import sql

from coupon.store.queries import parse_query_file

if TYPE_CHECKING:
    from psycopg import AsyncConnection

log = logging.getLogger("coupon.store.postgres")


@cache
def webhook_queries() -> dict[str, str]:
    text = files("coupon.store").joinpath("sql", "webhooks.sql").read_text(encoding="utf-8")
    return parse_query_file(text)


def schema_mark() -> str:
    return f"procrastinate {version('procrastinate')} schema, installed by coupon-issuer"


async def apply_procrastinate_schema(conn: AsyncConnection[Any]) -> bool:
    """Install the schema unless present; True when installed now. Run under the lock."""
    cursor = await conn.execute(webhook_queries()["procrastinate_schema_version"])
    row = await cursor.fetchone()
    mark = None if row is None else row[0]
    if mark is None:
        await conn.execute(SchemaManager.get_schema())
        comment = sql.SQL(webhook_queries()["mark_procrastinate_schema"])
        await conn.execute(comment.format(mark=sql.Literal(schema_mark())))
        log.info("installed the webhook outbox schema (%s)", schema_mark())
        return True
    if mark != schema_mark():
        log.warning(
            "the webhook outbox schema says %r but this build runs %r: apply procrastinate's "
            "migrations between the two versions",
            mark,
            schema_mark(),
        )
    return False
