"""Release a burst of IssueCoupon calls at a campaign's start instant and audit the result.

    python scripts/concurrency_check.py --url http://127.0.0.1:8080 --requests 10000 --total 100

It creates a campaign that starts --start-in-s seconds ahead, opens --concurrency connections
and warms each one with a GetCampaign, then releases every request at the start instant. Calls
that land a hair before the server's start instant get failed_precondition; those are retried
until they get a code or sold out, and counted as "early attempts". Given --url several times
(replicas of one deployment, sharing one database), it spreads the connections over them in
turn, so the race for the last codes runs across processes; the campaign is created and audited
through the first URL. It then checks:

- exactly min(total, requests) codes were received, all distinct and well formed;
- every other answer was resource_exhausted (sold out), and nothing else came back;
- GetCampaign, read over all its pages, lists exactly the received codes, once each, and its
  issuedCount agrees.

Exit status: 0 when every check holds, 1 on any violation, 2 when the run itself could not be
set up (server unreachable, campaign not created).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import ssl
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import customer_tokens
import httptools

SERVICE = "/coupon.CouponService"
JSON_HEADERS = {"Content-Type": "application/json"}
CODE_LENGTH = 10
MAX_PAGE_SIZE = 10_000
# Backoff between retries of an early (failed_precondition) call: short, because the campaign
# is about to open, but not zero, so a badly skewed clock does not turn into a busy loop.
EARLY_RETRY_PAUSE_S = 0.002


def is_code(text: str) -> bool:
    """10 characters, each a Hangul syllable or an ASCII digit (DESIGN §2)."""
    return len(text) == CODE_LENGTH and all(
        "\uac00" <= c <= "\ud7a3" or "0" <= c <= "9" for c in text
    )


@dataclass
class Tally:
    codes: list[str] = field(default_factory=list)
    sold_out: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    early_attempts: int = 0
    latencies_s: list[float] = field(default_factory=list)
    done: int = 0


class SetupError(Exception):
    """The run could not start (no server, campaign not created)."""


def admin_headers(token: str) -> dict[str, str]:
    return {**JSON_HEADERS, "Authorization": f"Bearer {token}"} if token else JSON_HEADERS


def rfc3339(instant: datetime) -> str:
    return instant.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TransportError(Exception):
    """The connection failed or the server answered something that is not HTTP."""


class Connection:
    """One keep-alive HTTP/1.1 connection, used by one task at a time.

    httpx managed ~150-500 calls/s here against a server that takes ~4k/s, which would stretch
    the burst over seconds and hide races; this thin client (asyncio streams + httptools, which
    uvicorn[standard] already installs) keeps the burst as sharp as the server allows, and
    opens exactly one connection per worker so the warm-up really warms what the burst uses.
    """

    def __init__(self, url: str, timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SetupError(f"--url must be http(s)://host[:port], got {url!r}")
        self._host = parts.hostname
        self._tls = parts.scheme == "https"
        self._port = parts.port or (443 if self._tls else 80)
        self._host_header = parts.netloc
        self._prefix = parts.path.rstrip("/")
        self._timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is not None and self._writer is not None:
            return self._reader, self._writer
        context = ssl.create_default_context() if self._tls else None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port, ssl=context), self._timeout_s
            )
        except (OSError, TimeoutError) as e:
            raise TransportError(f"connect to {self._host}:{self._port}: {e!r}") from e
        self._reader, self._writer = reader, writer
        return reader, writer

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        reader, writer = await self._connect()
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(
            f"POST {self._prefix}{path} HTTP/1.1\r\nHost: {self._host_header}\r\n{head}"
            f"Content-Length: {len(body)}\r\n\r\n".encode("latin-1")
            + body
        )
        chunks: list[bytes] = []
        complete = False

        class Callbacks:
            def on_body(self, data: bytes) -> None:
                chunks.append(data)

            def on_message_complete(self) -> None:
                nonlocal complete
                complete = True

        parser = httptools.HttpResponseParser(Callbacks())
        try:
            await asyncio.wait_for(writer.drain(), self._timeout_s)
            while not complete:
                data = await asyncio.wait_for(reader.read(65536), self._timeout_s)
                if not data:
                    raise TransportError("server closed the connection")
                parser.feed_data(data)
        except (OSError, TimeoutError, httptools.HttpParserError, TransportError) as e:
            await self.close()
            if isinstance(e, TransportError):
                raise
            raise TransportError(repr(e)) from e
        if not parser.should_keep_alive():
            await self.close()
        return parser.get_status_code(), b"".join(chunks)

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            # The peer may already be gone; the socket is closed either way.
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


async def rpc(
    conn: Connection, method: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    status, raw = await conn.post(f"{SERVICE}/{method}", json.dumps(body).encode(), headers)
    try:
        payload = json.loads(raw) if raw else {}
    except ValueError:
        payload = {"code": "non_json", "message": raw[:200].decode("utf-8", "replace")}
    return status, payload if isinstance(payload, dict) else {}


async def list_all_codes(
    client: Connection, campaign_id: str, token: str
) -> tuple[list[str], int, int]:
    """Every code GetCampaign lists, across all pages; also issuedCount and total."""
    codes: list[str] = []
    token_page = ""
    issued_count = total = 0
    for _ in range(100_000):  # bound: a server that never ends its pages must not hang us
        status, body = await rpc(
            client,
            "GetCampaign",
            {"campaignId": campaign_id, "pageSize": MAX_PAGE_SIZE, "pageToken": token_page},
            admin_headers(token),
        )
        if status != 200:
            raise SetupError(f"GetCampaign answered HTTP {status}: {body}")
        codes.extend(body.get("issuedCodes", []))
        issued_count = int(body.get("issuedCount", 0))
        total = int(body.get("total", 0))
        token_page = body.get("nextPageToken", "")
        if not token_page:
            return codes, issued_count, total
    raise SetupError("GetCampaign kept returning a nextPageToken")


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


async def progress_bar(tally: Tally, requests: int, stop: asyncio.Event) -> None:
    """A one-line stderr bar; drawn only on a terminal so logs and CI output stay clean."""
    width = 30
    while True:
        filled = width * tally.done // max(1, requests)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {tally.done}/{requests} "
            f"issued={len(tally.codes)} sold_out={tally.sold_out} "
            f"errors={sum(tally.errors.values())}"
        )
        sys.stderr.flush()
        if stop.is_set():
            sys.stderr.write("\n")
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.1)


async def run(args: argparse.Namespace) -> int:
    client = Connection(args.url[0], args.request_timeout_s)
    connections = [
        Connection(args.url[i % len(args.url)], args.request_timeout_s)
        for i in range(args.concurrency)
    ]
    try:
        return await run_with(args, client, connections)
    finally:
        await asyncio.gather(*(c.close() for c in [client, *connections]))


async def run_with(
    args: argparse.Namespace, client: Connection, connections: list[Connection]
) -> int:
    # Customers' tokens are signed before the campaign exists, so signing (about a
    # millisecond per RS256 token) is not part of the burst.
    minter = customer_tokens.minter_from(args)
    customer_headers: list[dict[str, str]] = []
    if minter is not None:
        customer_headers = [
            {**JSON_HEADERS, **minter.headers(f"cc-user-{index}")} for index in range(args.requests)
        ]
    start_time = datetime.now(UTC) + timedelta(seconds=args.start_in_s)
    start_time = start_time.replace(microsecond=start_time.microsecond // 1000 * 1000)
    try:
        status, body = await rpc(
            client,
            "CreateCampaign",
            {
                "name": f"concurrency-check {uuid.uuid4().hex[:8]}",
                "total": args.total,
                "startTime": rfc3339(start_time),
            },
            admin_headers(args.token),
        )
    except TransportError as e:
        raise SetupError(f"cannot reach {args.url[0]}: {e}") from e
    if status != 200 or "campaignId" not in body:
        raise SetupError(f"CreateCampaign answered HTTP {status}: {body}")
    campaign_id: str = body["campaignId"]
    print(f"Campaign {campaign_id}: total={args.total}, starts at {rfc3339(start_time)}")

    # Warm-up: one GetCampaign per connection, all at once, so the pool really holds
    # `concurrency` open connections when the burst is released.
    try:
        await asyncio.gather(
            *(
                rpc(conn, "GetCampaign", {"campaignId": campaign_id}, admin_headers(args.token))
                for conn in connections
            )
        )
    except TransportError as e:
        raise SetupError(f"warm-up failed: {e}") from e
    if datetime.now(UTC) >= start_time:
        print(
            "warning: the warm-up ended after the start instant; "
            "raise --start-in-s for a sharp burst",
            file=sys.stderr,
        )

    tally = Tally()
    release = asyncio.Event()
    next_index = iter(range(args.requests))
    issue_headers = JSON_HEADERS

    async def worker(conn: Connection) -> None:
        await release.wait()
        for index in next_index:
            request: dict[str, Any] = {"campaignId": campaign_id}
            if args.user_ids:
                request["userId"] = f"cc-user-{index}"
            headers = customer_headers[index] if customer_headers else issue_headers
            began = time.perf_counter()
            while True:
                try:
                    status, answer = await rpc(conn, "IssueCoupon", request, headers)
                except TransportError as e:
                    # Not retried: the call may have been served, so a retry could
                    # turn one lost answer into a second code.
                    tally.errors[f"transport: {e}"] += 1
                    break
                code = answer.get("code", "")
                if status == 400 and code == "failed_precondition":
                    tally.early_attempts += 1
                    await asyncio.sleep(EARLY_RETRY_PAUSE_S)
                    continue
                if status == 200 and isinstance(code, str) and code:
                    tally.codes.append(code)
                elif status == 429 and code == "resource_exhausted":
                    tally.sold_out += 1
                else:
                    tally.errors[f"HTTP {status} {code or '?'}"] += 1
                break
            tally.latencies_s.append(time.perf_counter() - began)
            tally.done += 1

    workers = [asyncio.create_task(worker(conn)) for conn in connections]
    stop_bar = asyncio.Event()
    bar = (
        asyncio.create_task(progress_bar(tally, args.requests, stop_bar))
        if (args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty()))
        else None
    )
    # The local clock decides the release; on loopback it is the server's clock too.
    # Against a remote server, skew shows up as early attempts (ahead) or latency (behind).
    await asyncio.sleep(max(0.0, (start_time - datetime.now(UTC)).total_seconds()))
    released_at = time.perf_counter()
    release.set()
    try:
        await asyncio.wait_for(asyncio.gather(*workers), timeout=args.timeout_s)
    except TimeoutError:
        for task in workers:
            task.cancel()
        tally.errors["run timeout"] += args.requests - tally.done
    elapsed = time.perf_counter() - released_at
    stop_bar.set()
    if bar is not None:
        await bar

    try:
        listed, issued_count, listed_total = await list_all_codes(client, campaign_id, args.token)
    except (SetupError, TransportError) as e:
        listed, issued_count, listed_total = [], -1, -1
        tally.errors[f"GetCampaign failed: {e}"] += 1

    return report(args, tally, elapsed, listed, issued_count, listed_total)


def report(
    args: argparse.Namespace,
    tally: Tally,
    elapsed: float,
    listed: list[str],
    issued_count: int,
    listed_total: int,
) -> int:
    errors = sum(tally.errors.values())
    print(f"Issued: {len(tally.codes)} codes, SoldOut: {tally.sold_out}, Errors: {errors}")
    latencies = sorted(tally.latencies_s)
    print(
        "Latency (release or first send to final answer, incl. early retries): "
        + ", ".join(
            f"{name}={percentile(latencies, q) * 1000:.1f}ms"
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
        )
    )
    print(
        f"Requests: {tally.done} in {elapsed:.2f}s ({tally.done / max(elapsed, 1e-9):.0f}/s), "
        f"early attempts (failed_precondition, retried): {tally.early_attempts}"
    )
    for kind, count in tally.errors.most_common():
        print(f"  error {kind}: {count}")

    expected = min(args.total, args.requests)
    violations: list[str] = []
    received = Counter(tally.codes)
    duplicates = [c for c, n in received.items() if n > 1]
    if len(tally.codes) != expected:
        violations.append(f"received {len(tally.codes)} codes, expected exactly {expected}")
    if duplicates:
        violations.append(f"{len(duplicates)} code(s) received more than once: {duplicates[:5]}")
    malformed = [c for c in received if not is_code(c)]
    if malformed:
        violations.append(f"{len(malformed)} malformed code(s): {malformed[:5]}")
    if tally.sold_out != args.requests - expected:
        violations.append(f"{tally.sold_out} sold-out answers, expected {args.requests - expected}")
    if errors:
        violations.append(f"{errors} answer(s) were neither a code nor sold out")
    listed_counts = Counter(listed)
    listed_dupes = [c for c, n in listed_counts.items() if n > 1]
    if listed_dupes:
        violations.append(f"GetCampaign lists {len(listed_dupes)} code(s) more than once")
    if listed_total >= 0 and len(listed) > listed_total:
        violations.append(f"GetCampaign lists {len(listed)} codes for a total of {listed_total}")
    if issued_count >= 0 and issued_count != len(listed):
        violations.append(f"GetCampaign issuedCount={issued_count} but lists {len(listed)}")
    missing = set(received) - set(listed_counts)
    if missing:
        violations.append(f"{len(missing)} received code(s) not listed by GetCampaign")
    extra = set(listed_counts) - set(received)
    if extra:
        # A code stored but never acknowledged: the client lost it (e.g. a timeout).
        violations.append(f"GetCampaign lists {len(extra)} code(s) no client received")

    if violations:
        print("FAIL:")
        for violation in violations:
            print(f"  - {violation}")
        return 1
    print(f"OK: exactly {expected} distinct codes, the rest sold out; GetCampaign agrees")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Burst IssueCoupon at a campaign's start instant and check exactly-N.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--url",
        action="append",
        help="server base URL; repeat it for replicas that share one database "
        "(default: http://127.0.0.1:8080)",
    )
    parser.add_argument("--requests", type=int, default=10_000, help="IssueCoupon calls")
    parser.add_argument(
        "--total",
        type=int,
        default=100,
        help="campaign size: enough winners to catch duplicates, and with the default "
        "--requests 99%% of the burst must be refused (use 1 for the sharpest race)",
    )
    parser.add_argument("--concurrency", type=int, default=200, help="connections, all in use")
    parser.add_argument(
        "--start-in-s", type=float, default=3.0, help="the campaign starts this far ahead"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("COUPON_ADMIN_TOKEN", ""),
        help="admin API key for CreateCampaign/GetCampaign (default: $COUPON_ADMIN_TOKEN)",
    )
    parser.add_argument(
        "--user-ids", action="store_true", help="send a distinct userId with every call"
    )
    customer_tokens.add_arguments(parser)
    parser.add_argument("--request-timeout-s", type=float, default=30.0)
    parser.add_argument("--timeout-s", type=float, default=300.0, help="bound for the burst")
    parser.add_argument("--progress", choices=("auto", "on", "off"), default="auto")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.total < 1 or args.concurrency < 1:
        parser.error("--requests, --total and --concurrency must be at least 1")
    args.url = args.url or ["http://127.0.0.1:8080"]
    if args.concurrency < len(args.url):
        parser.error("--concurrency must be at least the number of --url")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except SetupError as e:
        print(f"concurrency_check: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
