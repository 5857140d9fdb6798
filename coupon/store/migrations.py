"""Versioned schema migrations, applied at start-up by whichever process gets there first."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from coupon.store.queries import migrations, queries
from coupon.webhooks.pg_schema import apply_procrastinate_schema

if TYPE_CHECKING:
    from psycopg import AsyncConnection

log = logging.getLogger("coupon.store.postgres")

# Any fixed 64-bit number; it only has to differ from other advisory locks in the database.
MIGRATION_LOCK_ID = 0x636F75706F6E  # "coupon"


async def apply_migrations(conn: AsyncConnection[Any]) -> list[int]:
    """Apply the pending migrations in one transaction; return the versions applied.

    The advisory lock serializes concurrent starters, so applying twice (or at once from
    several processes) is a no-op for all but the first.
    """
    sql = queries()
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute(sql["lock_migrations"], {"lock_id": MIGRATION_LOCK_ID})
        await conn.execute(sql["create_migrations_table"])
        cursor = await conn.execute(sql["applied_migrations"])
        done = {row[0] for row in await cursor.fetchall()}
        for migration in migrations():
            if migration.version in done:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                sql["record_migration"], {"version": migration.version, "name": migration.name}
            )
            applied_now.append(migration.version)
        await apply_procrastinate_schema(conn)
    for version in applied_now:
        log.info("applied schema migration %04d", version)
    return applied_now
