"""Smoke tests for the load and concurrency tools (scripts/): each runs briefly on loopback.

The tools run as subprocesses, as a user would run them, against a server in this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from coupon.app import create_app
from coupon.config import Config
from coupon.store.memory import MemoryStore
from tests.auth_support import AUDIENCE, ISSUER, KEYS, jwt_config, locked_auth, rsa_pair
from tests.support import ServerThread

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from starlette.types import Receive, Scope, Send

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


@pytest.fixture
def real_server() -> Iterator[str]:
    with ServerThread(create_app(Config(), MemoryStore())) as server:
        yield server.base_url


class OversellingServer:
    """A broken server under test: it never sells out and lists every code it handed out."""

    def __init__(self) -> None:
        self.codes: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        method = scope["path"].rsplit("/", 1)[-1]
        answer: dict[str, Any]
        if method == "CreateCampaign":
            answer = {"campaignId": str(uuid.uuid4())}
        elif method == "IssueCoupon":
            self.codes.append(f"{len(self.codes):010d}")
            answer = {"code": self.codes[-1], "issuedAt": "2026-11-21T09:00:00Z"}
        elif method == "GetCampaign":
            answer = {"total": 20, "issuedCodes": self.codes, "issuedCount": len(self.codes)}
        else:  # /healthz
            answer = {}
        payload = json.dumps(answer).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": payload})


@pytest.fixture
def overselling_server() -> Iterator[str]:
    with ServerThread(OversellingServer()) as server:
        yield server.base_url


def run_tool(command: list[str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
    )


def concurrency_check(*urls: str, extra: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    return run_tool(
        [
            sys.executable,
            str(SCRIPTS / "concurrency_check.py"),
            *(arg for url in urls for arg in ("--url", url)),
            "--requests",
            "300",
            "--total",
            "20",
            "--start-in-s",
            "1",
            "--concurrency",
            "50",
            *extra,
        ]
    )


def test_concurrency_check_passes_against_the_server(real_server: str) -> None:
    done = concurrency_check(real_server)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Issued: 20 codes, SoldOut: 280, Errors: 0" in done.stdout
    assert "OK: exactly 20 distinct codes" in done.stdout


def test_concurrency_check_spreads_its_connections_over_every_url(real_server: str) -> None:
    # Two servers with separate stores: the campaign exists only on the first, so the calls
    # that reach the second answer not_found, which shows the second URL got its share.
    with ServerThread(create_app(Config(), MemoryStore())) as other:
        done = concurrency_check(real_server, other.base_url)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "error HTTP 404 not_found" in done.stdout
    assert "FAIL:" in done.stdout


def test_concurrency_check_fails_against_an_overselling_server(overselling_server: str) -> None:
    done = concurrency_check(overselling_server)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Issued: 300 codes, SoldOut: 0, Errors: 0" in done.stdout
    assert "FAIL:" in done.stdout
    assert "received 300 codes, expected exactly 20" in done.stdout


def locust(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_tool(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(SCRIPTS / "locustfile.py"),
            "--headless",
            "-H",
            url,
            "-u",
            "10",
            "-r",
            "10",
            "-t",
            "3s",
            "--only-summary",
            "--campaign-total",
            "50",
            *extra,
        ]
    )


def test_locust_headless_passes_its_audit(real_server: str) -> None:
    done = locust(real_server)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "VERDICT: PASS" in output
    assert "IssueCoupon [sold out]" in output  # counted by name, not as a failure


def test_locust_headless_fails_its_audit_on_overselling(overselling_server: str) -> None:
    done = locust(overselling_server)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "VERDICT: FAIL" in output


def run_bench(
    tmp_path: Path, *rows_and_flags: str, tools: tuple[str, ...] = ("wrk",), timeout_s: float = 60
) -> str:
    """One short bench.py run (1 s, 1 run, no warm-up); its Markdown report."""
    return run_bench_with_log(tmp_path, *rows_and_flags, tools=tools, timeout_s=timeout_s)[0]


def run_bench_with_log(
    tmp_path: Path, *rows_and_flags: str, tools: tuple[str, ...] = ("wrk",), timeout_s: float = 60
) -> tuple[str, str]:
    """One short bench.py run (1 s, 1 run unless --runs follows, no warm-up); its Markdown
    report and its progress log."""
    packages = {"wrk": "wrk", "h2load": "nghttp2-client"}
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.fail(
                f"{tool} is not installed; bench.py needs it: apt-get install -y {packages[tool]}"
            )
    report = tmp_path / "bench.md"
    done = run_tool(
        [
            sys.executable,
            str(SCRIPTS / "bench.py"),
            *("--duration", "1", "--runs", "1", "--warmup", "0"),
            *("--output", str(report), "--chart", str(tmp_path / "bench.png")),
            *rows_and_flags,
        ],
        timeout_s=timeout_s,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return report.read_text(), done.stderr


def test_bench_runs_the_echo_rows(tmp_path: Path) -> None:
    text = run_bench(tmp_path, "--only", "echo")
    assert "| echo baseline, c=64 | echoes/s |" in text
    assert "not measured" not in text


def test_bench_runs_the_redeem_row(tmp_path: Path, pg_dsn: str) -> None:
    text = run_bench(tmp_path, "--only", "redeem", "--dsn", pg_dsn, timeout_s=180)
    (row,) = [line for line in text.splitlines() if line.startswith("| Redeem")]
    print(f"\n{row}")
    assert row.startswith("| RedeemCoupon, postgres, 2 worker(s), c=64 | redeemed/s | ")
    assert "not measured" not in row
    assert "!" not in row  # a violation note: codes ran out, or counts that disagree


def test_bench_runs_the_webhooks_pairs_and_waits_for_every_delivery(
    tmp_path: Path, pg_dsn: str
) -> None:
    text = run_bench(tmp_path, "--only", "webhooks", "--dsn", pg_dsn, timeout_s=300)
    rows = [line for line in text.splitlines() if line.startswith("| postgres, 1 worker")]
    print("\n" + "\n".join(rows))
    on = [row for row in rows if "webhooks on" in row]
    # Per concurrency: in-server delivery and a --role webhooks process, each beside its own
    # "off" server and measured against it, each run followed by every event's delivery.
    assert len(rows) == 12, rows  # c=64, 128, 256
    assert len(on) == 6, rows
    assert sum("delivered by --role webhooks" in row for row in on) == 3, on
    for row in on:
        assert "x postgres" in row, row
        assert "all delivered" in row, row
    assert "not measured" not in text
    assert not any("!" in row for row in rows), rows


def test_bench_runs_the_jwt_rows(tmp_path: Path) -> None:
    text = run_bench(tmp_path, "--only", "jwt", "--jwt-customers", "50")
    for label in ("no-JWT customers (userId)", "RS256 customers", "ES256 customers"):
        assert f"| {label}, retrying, memory, c=64 | answers/s |" in text
    assert "x no-JWT customers" in text
    assert "not measured" not in text
    assert "50 codes for" in text  # every customer got one code, however often it called


@pytest.fixture
def locked_server(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """A server that wants an admin key and customers' JWTs; yields its URL and the flags a
    tool needs to run against it."""
    pair = rsa_pair()
    private_key = tmp_path / "customers-private.pem"
    private_key.write_bytes(pair.private_pem)
    config = replace(Config(), auth=locked_auth(jwt_config(pair.write_public(tmp_path))))
    flags = [
        *("--token", KEYS["ops"][0], "--jwt-key", str(private_key), "--jwt-alg", "RS256"),
        *("--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE),
    ]
    with ServerThread(create_app(config, MemoryStore())) as server:
        yield server.base_url, flags


def test_concurrency_check_runs_against_a_locked_server(
    locked_server: tuple[str, list[str]],
) -> None:
    url, flags = locked_server
    done = concurrency_check(url, extra=flags)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Issued: 20 codes, SoldOut: 280, Errors: 0" in done.stdout
    refused = concurrency_check(url, extra=flags[:2])  # the admin key, but no customers' tokens
    assert "HTTP 401 unauthenticated" in refused.stdout, refused.stdout + refused.stderr


def test_locust_runs_against_a_locked_server(locked_server: tuple[str, list[str]]) -> None:
    url, flags = locked_server
    done = locust(url, *flags)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "VERDICT: PASS" in output


def test_bench_runs_the_protocol_rows_with_cpu_per_call(tmp_path: Path) -> None:
    text = run_bench(tmp_path, "--only", "protocols", tools=("wrk", "h2load"), timeout_s=120)
    assert "not measured" not in text, text
    rows = {
        line.split(" | ")[0].lstrip("| "): line.split(" | ")
        for line in text.splitlines()
        if ", memory, pyvoy, c=64 | issued/s |" in line
    }
    assert sorted(rows) == sorted(
        [
            "Connect JSON HTTP/1.1 (wrk), memory, pyvoy, c=64",
            "Connect binary HTTP/1.1 (wrk), memory, pyvoy, c=64",
            "Connect binary h2c (h2load), memory, pyvoy, c=64",
            "gRPC h2c (h2load), memory, pyvoy, c=64",
        ]
    ), text
    for cells in rows.values():
        cpu_us_per_call = float(cells[5].replace(",", ""))
        assert cpu_us_per_call > 0  # measured from the server's /proc stat, not left blank
        assert "!" not in cells[-1], cells  # notes flag violations (fewer issued than acked)
    assert "x Connect binary h2c (h2load)" in rows["gRPC h2c (h2load), memory, pyvoy, c=64"][7]


def test_profile_samples_the_memory_hot_path(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed; scripts/profile.py needs it: apt-get install -y wrk")
    report = tmp_path / "profile.md"
    done = run_tool(
        [
            sys.executable,
            str(SCRIPTS / "profile.py"),
            *("--only", "memory", "--duration", "1", "--warmup", "0", "--output", str(report)),
        ],
        timeout_s=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = report.read_text()
    assert "### IssueCoupon, memory store, 1 worker, c=64" in text
    samples = int(re.search(r"([\d,]+) samples at", text)[1].replace(",", ""))  # type: ignore[index]
    assert samples > 0
    # Our service answered the calls it sampled, and its frames are attributed to us.
    assert "CouponServiceImpl.issue_coupon (coupon/service.py)" in text
    assert "| ours (coupon/) |" in text


def test_bench_measures_memory_beside_echo_in_turns(tmp_path: Path) -> None:
    text, log = run_bench_with_log(tmp_path, "--only", "echo,memory", "--runs", "2", timeout_s=120)
    # Both servers are up together and each run of a memory row follows one of echo's, so a
    # drift of the machine's speed weighs on both sides of the ratio alike.
    assert log.count("starting ") == 1, log
    assert "starting echo and memory side by side" in log
    turns = [line[:-1] for line in log.splitlines() if line.endswith(", c=64:")]
    assert turns == ["echo baseline, c=64", "memory, 1 worker, c=64"] * 2
    rows = {
        line.split(" | ")[0].lstrip("| "): line.split(" | ")
        for line in text.splitlines()
        if line.startswith("| memory") or line.startswith("| echo")
    }
    for c in (64, 256):
        assert rows[f"echo baseline, c={c}"][6].count(", ") == 1  # its two runs
        assert rows[f"memory, 1 worker, c={c}"][7].endswith("x echo baseline")


def test_bench_notes_a_run_the_host_slowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run during which the host took the CPUs from this machine (steal) says so in its
    note, so that a disturbed run is told apart from a slower server."""
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    assert bench.stolen_cpu_s() >= 0.0
    row = bench.Row("echo@64", "echo", "echoes/s", None)
    run = {"requests": 1000, "duration_us": 10_000_000, "non2xx": 0, "p50_us": 1, "p99_us": 2}
    cpus = os.cpu_count() or 1
    bench.record_run(row, "1/2", {**run, "stolen_s": 0.0}, 1000, None, "")
    bench.record_run(row, "2/2", {**run, "stolen_s": 0.25 * 10 * cpus}, 1000, None, "")
    assert [sample.note for sample in row.samples] == ["", "host took 25% of the CPUs (steal)"]
