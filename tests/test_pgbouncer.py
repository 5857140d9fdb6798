"""PgBouncer in transaction mode: no prepared statements and no session state, so a storm
through it is exact. The server-side timeouts come from the database's (or role's) settings,
since PgBouncer 1.18 refuses the `options` startup parameter (database.session_options off)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg

from tests.pgbouncer import PgBouncer
from tests.server_process import ServerProcess
from tests.test_faults import (
    Storm,
    audit,
    check_acknowledged_codes_stored,
    classes,
    create_campaign,
)

if TYPE_CHECKING:
    from pathlib import Path

TOTAL = 1000
EXTRA = 200  # calls past the sell-out: each must be refused cleanly


async def test_a_storm_through_pgbouncer_in_transaction_mode_is_exact(
    tmp_path: Path, pg_dsn: str
) -> None:
    dbname = psycopg.conninfo.conninfo_to_dict(pg_dsn)["dbname"]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        # What docs/postgres.md recommends behind PgBouncer: settings per database or role.
        conn.execute(f"ALTER DATABASE \"{dbname}\" SET statement_timeout = '5s'")
        conn.execute(f"ALTER DATABASE \"{dbname}\" SET lock_timeout = '2s'")
    with PgBouncer(pg_dsn, pool_size=4) as bouncer:
        with psycopg.connect(bouncer.dsn, prepare_threshold=None) as conn:
            row = conn.execute("SHOW statement_timeout").fetchone()
        extra = {
            "database": {"session_options": False, "pool_max_size": 8},
            # A client starved of CPU for seconds (the suite shares 2 cores) could otherwise
            # reuse a kept-alive connection the server just closed: keep-alive is not on trial.
            "server": {"keepalive_timeout_s": 60, "header_timeout_s": 60},
        }
        with ServerProcess(tmp_path, bouncer.dsn, workers=2, extra=extra) as server:
            server.wait_for("/readyz", 200)
            campaign_id = create_campaign(server.base_url, TOTAL)
            storm = Storm(server.base_url, campaign_id, max_calls=TOTAL + EXTRA)
            outcomes = await storm.run()
            log = server.log()
        bouncer_log = bouncer.log()

    final = audit(pg_dsn, campaign_id)
    print(
        f"\npgbouncer storm (transaction mode, pool of 4 server connections, 2 workers):"
        f" {len(outcomes)} calls: {classes(outcomes)};"
        f" audit (total, issued, stored, distinct): {final.as_tuple()};"
        f" statement_timeout through pgbouncer: {row[0] if row else None}"
    )
    assert row == ("5s",)
    assert classes(outcomes) == {"200": TOTAL, "429 resource_exhausted": EXTRA}
    assert final.as_tuple() == (TOTAL,) * 4
    check_acknowledged_codes_stored(outcomes, final)
    assert "Traceback" not in log
    assert "prepared statement" not in bouncer_log
