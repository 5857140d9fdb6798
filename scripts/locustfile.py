"""Locust load for the coupon issuer: IssueCoupon over Connect JSON, audited at the end.

Headless:
    locust -f scripts/locustfile.py --headless -H http://127.0.0.1:8080 \
        -u 200 -r 50 -t 60s --campaign-total 5000 --html report.html
Web UI (http://127.0.0.1:8089):
    locust -f scripts/locustfile.py -H http://127.0.0.1:8080 --web-host 127.0.0.1
Against a locked deployment: --token <admin API key> for the run's own admin calls, and
--jwt-key <signing key> (with --jwt-alg/--jwt-issuer/--jwt-audience) so that each Locust user
is a customer with its own JWT (see scripts/customer_tokens.py).

At test start the run creates its own campaign (--campaign-total codes, opening
--start-offset-s seconds later), unless --campaign-id names an existing one. Sold out and
not-yet-started answers are expected: they are counted under their own request names
("IssueCoupon [sold out]", "IssueCoupon [not started]"), not as failures. At test stop the
run reads the campaign through GetCampaign (every page) and checks that at most `total` codes
exist, none twice, and that every code a Locust user received is among them. A violation
prints "VERDICT: FAIL" and makes locust exit with status 1.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import customer_tokens
import gevent
from locust import FastHttpUser, constant, events, task
from locust.runners import MasterRunner, WorkerRunner

if TYPE_CHECKING:
    from locust.env import Environment

SERVICE = "/coupon.CouponService"
MAX_PAGE_SIZE = 10_000


class RunState:
    """What this process knows about the run: the campaign and the codes its users received."""

    def __init__(self) -> None:
        self.campaign_id: str | None = None
        self.lock = threading.Lock()
        # code -> the identities that received it; with user ids a repeat call returns the
        # same code to the same user, which is not a duplicate.
        self.received: dict[str, set[str]] = {}

    def reset(self, campaign_id: str | None) -> None:
        with self.lock:
            self.campaign_id = campaign_id
            self.received = {}

    def record(self, code: str, who: str) -> None:
        with self.lock:
            self.received.setdefault(code, set()).add(who)


STATE = RunState()


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--campaign-total", type=int, default=1000, help="size of the campaign the run creates"
    )
    parser.add_argument(
        "--start-offset-s",
        type=float,
        default=0.0,
        help="the created campaign opens this many seconds after the test starts",
    )
    parser.add_argument(
        "--campaign-id", default="", help="reuse this campaign instead of creating one"
    )
    parser.add_argument(
        "--user-ids",
        action="store_true",
        default=False,
        help="each Locust user sends its own userId (one code per user; repeats return it)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("COUPON_ADMIN_TOKEN", ""),
        help="admin API key for CreateCampaign/GetCampaign (default: $COUPON_ADMIN_TOKEN)",
        is_secret=True,  # masked in the web UI
    )
    customer_tokens.add_arguments(parser)


def admin_call(environment: Environment, method: str, body: dict[str, Any]) -> dict[str, Any]:
    """One admin RPC with the standard library, outside Locust's statistics."""
    headers = {"Content-Type": "application/json"}
    token = environment.parsed_options.token
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"{(environment.host or '').rstrip('/')}{SERVICE}/{method}",
        data=json.dumps(body).encode(),
        headers=headers,
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode("utf-8", "replace")
        raise RuntimeError(f"{method} answered HTTP {e.code}: {detail}") from None


@events.test_start.add_listener
def on_test_start(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return  # the master creates the campaign and sends its id
    if not environment.host:
        raise RuntimeError("no host: pass -H http://127.0.0.1:8080 (or set it in the web UI)")
    options = environment.parsed_options
    campaign_id = options.campaign_id
    if not campaign_id:
        body: dict[str, Any] = {
            "name": f"locust {uuid.uuid4().hex[:8]}",
            "total": options.campaign_total,
        }
        if options.start_offset_s > 0:
            start = datetime.now(UTC) + timedelta(seconds=options.start_offset_s)
            body["startTime"] = start.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        campaign_id = admin_call(environment, "CreateCampaign", body)["campaignId"]
        print(f"Created campaign {campaign_id} (total={options.campaign_total})", flush=True)
    STATE.reset(campaign_id)
    if isinstance(environment.runner, MasterRunner):
        environment.runner.send_message("coupon_campaign", campaign_id)


@events.init.add_listener
def on_init(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):

        def set_campaign(message: Any, **_: Any) -> None:
            STATE.reset(message.data)

        runner.register_message("coupon_campaign", set_campaign)
    elif isinstance(runner, MasterRunner):

        def add_codes(message: Any, **_: Any) -> None:
            for code, identities in message.data:
                for who in identities:
                    STATE.record(code, who)

        runner.register_message("coupon_codes", add_codes)


@events.test_stop.add_listener
def on_test_stop(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        with STATE.lock:
            codes = [(code, sorted(who)) for code, who in STATE.received.items()]
        runner.send_message("coupon_codes", codes)
        return
    if isinstance(runner, MasterRunner):
        # Workers' codes arrive as messages after their own test_stop: audit at quitting.
        return
    audit(environment)


@events.quitting.add_listener
def on_quitting(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, MasterRunner):
        audit(environment)


def audit(environment: Environment) -> None:
    campaign_id = STATE.campaign_id
    if campaign_id is None:
        return  # the test never started
    with STATE.lock:
        received = {code: set(who) for code, who in STATE.received.items()}
    problems: list[str] = []
    try:
        listed, issued_count, total = list_codes(environment, campaign_id)
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        print(f"VERDICT: FAIL - could not read campaign {campaign_id}: {e}", flush=True)
        environment.process_exit_code = 1
        return
    counts = Counter(listed)
    duplicated = [code for code, n in counts.items() if n > 1]
    if len(listed) > total:
        problems.append(f"{len(listed)} codes stored for a total of {total}")
    if duplicated:
        problems.append(f"{len(duplicated)} code(s) stored more than once: {duplicated[:5]}")
    if issued_count != len(listed):
        problems.append(f"issuedCount={issued_count} but GetCampaign lists {len(listed)} codes")
    missing = [code for code in received if code not in counts]
    if missing:
        problems.append(f"{len(missing)} code(s) a user received are not stored: {missing[:5]}")
    shared = [code for code, who in received.items() if len(who) > 1]
    if shared:
        problems.append(f"{len(shared)} code(s) handed to more than one user: {shared[:5]}")
    summary = (
        f"campaign {campaign_id}: {len(listed)} of {total} codes issued, "
        f"{len(received)} distinct codes received by Locust users"
    )
    if problems:
        print(f"VERDICT: FAIL - {summary}", flush=True)
        for problem in problems:
            print(f"  - {problem}", flush=True)
        environment.process_exit_code = 1
    else:
        print(f"VERDICT: PASS - {summary}; none duplicated, all received codes stored", flush=True)


def list_codes(environment: Environment, campaign_id: str) -> tuple[list[str], int, int]:
    codes: list[str] = []
    page_token = ""
    for _ in range(100_000):  # bound: a server whose pages never end must not hang the run
        page = admin_call(
            environment,
            "GetCampaign",
            {"campaignId": campaign_id, "pageSize": MAX_PAGE_SIZE, "pageToken": page_token},
        )
        codes.extend(page.get("issuedCodes", []))
        page_token = page.get("nextPageToken", "")
        if not page_token:
            return codes, int(page.get("issuedCount", 0)), int(page["total"])
    raise RuntimeError("GetCampaign kept returning a nextPageToken")


class CouponUser(FastHttpUser):
    # No think time: the point is a rush on one campaign. Use -u to size the crowd.
    wait_time = constant(0)

    def on_start(self) -> None:
        self.user_id = f"locust-{uuid.uuid4().hex[:12]}"
        options = self.environment.parsed_options
        self.headers = {"Content-Type": "application/json"}
        minter = customer_tokens.minter_from(options)
        # A customer with a token is one user: the server takes the user id from the token.
        self.send_user_id = bool(options.user_ids) or minter is not None
        if minter is not None:
            self.headers.update(minter.headers(self.user_id))

    @task
    def issue_coupon(self) -> None:
        campaign_id = STATE.campaign_id
        if campaign_id is None:
            gevent.sleep(0.05)  # a worker whose campaign message has not arrived yet
            return
        body: dict[str, str] = {"campaignId": campaign_id}
        if self.send_user_id:
            body["userId"] = self.user_id
        with self.client.post(
            f"{SERVICE}/IssueCoupon",
            data=json.dumps(body),
            headers=self.headers,
            name="IssueCoupon",
            catch_response=True,
        ) as response:
            try:
                answer = response.json() if response.content else {}
            except ValueError:
                answer = {}
            code = answer.get("code", "") if isinstance(answer, dict) else ""
            if response.status_code == 200 and code:
                STATE.record(code, self.user_id if self.send_user_id else uuid.uuid4().hex)
                response.success()
            elif response.status_code == 429 and code == "resource_exhausted":
                response.request_meta["name"] = "IssueCoupon [sold out]"
                response.success()
            elif response.status_code == 400 and code == "failed_precondition":
                response.request_meta["name"] = "IssueCoupon [not started]"
                response.success()
            else:
                response.failure(f"HTTP {response.status_code} {code or response.text[:100]}")
