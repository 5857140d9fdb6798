"""Webhooks without PostgreSQL: signatures, retry schedule, config, the memory store's outbox."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import httpx
import pytest
from protobuf.wkt import Timestamp

from coupon.app import create_app
from coupon.config import Config, ConfigError, WebhookEndpoint, WebhooksConfig, load_config
from coupon.gen import coupon_pb
from coupon.webhooks.delivery import (
    Backoff,
    Deliverer,
    DeliveryFailed,
    encode_batch,
    endpoints_for,
)
from coupon.webhooks.events import (
    EVENT_ID_NAMESPACE,
    ISSUED,
    REDEEMED,
    REDEMPTION_CANCELLED,
    Event,
    event_id,
    new_event,
)
from coupon.webhooks.memory_outbox import MemoryOutbox
from coupon.webhooks.pg_outbox import batch_size, batch_time
from coupon.webhooks.signing import signature_header, verify
from tests.support import JSON, SERVICE, ServerThread, give_up_after
from tests.webhook_receiver import Receiver

SECRET = "test-secret-0123456789"


def test_a_signature_verifies_only_for_its_body_secret_and_time():
    body = b'{"events":[]}'
    header = signature_header(SECRET, body, 1_700_000_000)
    assert header.startswith("t=1700000000,v1=")
    assert verify(SECRET, body, header, now=1_700_000_010)
    assert not verify(SECRET, body + b" ", header, now=1_700_000_010)
    assert not verify("another-secret-0123456", body, header, now=1_700_000_010)
    assert not verify(SECRET, body, header, now=1_700_000_000 + 301)  # replayed later
    assert not verify(SECRET, body, "t=x,v1=00", now=1_700_000_000)


def test_backoff_doubles_up_to_its_cap_and_gives_up_after_max_attempts():
    backoff = Backoff(initial_s=1.0, cap_s=10.0, max_attempts=6)
    assert [backoff.delay_s(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert not backoff.gives_up(5)
    assert backoff.gives_up(6)


@pytest.mark.parametrize(
    ("endpoints", "message"),
    [
        ("[{url: 'ftp://x', secret: 0123456789abcdef0}]", "url must be an http"),
        ("[{url: 'http://x', secret: short}]", "secret must be a string of at least 16"),
        ("[{url: 'http://x', secret: 0123456789abcdef0, extra: 1}]", "unknown key(s)"),
        ("{url: 'http://x'}", "must be a list"),
        (
            "[{url: 'http://x', secret: 0123456789abcdef0},"
            " {url: 'http://x', secret: a123456789abcdef}]",
            "each url may appear once",
        ),
    ],
)
def test_bad_webhook_endpoints_are_refused_naming_the_key(endpoints: str, message: str):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        load_config(None, {"COUPON_WEBHOOKS_ENDPOINTS": endpoints})
    assert "0123456789abcdef" not in str(e.value)  # secrets are never echoed


def test_webhook_endpoints_load_from_yaml_without_printing_secrets(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "webhooks:\n  max_attempts: 3\n  endpoints:\n"
        f"    - {{url: 'https://crm.example.com/hooks', secret: '{SECRET}', brand: acme}}\n"
        f"    - {{url: 'https://all.example.com/hooks', secret: '{SECRET}'}}\n",
        encoding="utf-8",
    )
    webhooks = load_config(path).webhooks
    assert webhooks.max_attempts == 3
    assert [(e.url, e.brand) for e in webhooks.endpoints] == [
        ("https://crm.example.com/hooks", "acme"),
        ("https://all.example.com/hooks", ""),
    ]
    assert SECRET not in repr(webhooks)


def _wait_for_events(receiver: Receiver, count: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while receiver.distinct_events() < count:
        give_up_after(deadline, f"{count} webhook events (have {receiver.distinct_events()})")
        time.sleep(0.02)  # polling interval


def test_memory_store_sends_every_change_signed_after_failed_attempts():
    with Receiver(SECRET, fail_first=2) as receiver:
        hooks = WebhooksConfig(
            endpoints=(WebhookEndpoint(receiver.url, SECRET),),
            retry_initial_s=0.01,
            retry_max_s=0.05,
        )
        with ServerThread(create_app(replace(Config(), webhooks=hooks))) as server:
            post = lambda method, body: httpx.post(  # noqa: E731
                f"{server.base_url}{SERVICE}/{method}", json=body, headers=JSON, timeout=10
            )
            campaign = post("CreateCampaign", {"name": "hooks", "total": 5}).json()["campaignId"]
            first = post("IssueCoupon", {"campaignId": campaign, "userId": "u1"}).json()["code"]
            post("IssueCoupon", {"campaignId": campaign, "userId": "u1"})  # a repeat: no event
            second = post("IssueCoupon", {"campaignId": campaign}).json()["code"]
            redeemed = post("RedeemCoupon", {"code": first, "orderId": "o-1", "userId": "u1"})
            assert redeemed.status_code == 200, redeemed.text
            cancelled = post("CancelRedemption", {"code": first, "orderId": "o-1"})
            assert cancelled.status_code == 200, cancelled.text
            _wait_for_events(receiver, 4)
        events = receiver.events()
    print(f"\n{receiver.tallies.line()}")
    assert receiver.tallies.answered_500 == 2
    assert receiver.tallies.bad_signatures == 0
    summary = sorted(
        (e["type"], e["code"], e.get("userId", ""), e.get("orderId", "")) for e in events
    )
    assert summary == sorted(
        [
            ("coupon.issued", first, "u1", ""),
            ("coupon.issued", second, "", ""),
            ("coupon.redeemed", first, "u1", "o-1"),
            ("coupon.redemption_cancelled", first, "u1", "o-1"),
        ]
    )
    assert {e["campaignId"] for e in events} == {campaign}


async def test_memory_outbox_dead_letters_after_max_attempts():
    with Receiver(SECRET) as receiver:
        receiver.go_down()  # connection refused on every attempt
        endpoint = WebhookEndpoint(receiver.url, SECRET)
        outbox = MemoryOutbox(
            [endpoint], Backoff(0.01, 0.02, max_attempts=3), Deliverer(2.0), stop_timeout_s=3.0
        )
        await outbox.start()
        event = new_event(
            ISSUED, time=datetime.now(UTC), campaign_id="c", brand="", code="가나다라마0123"
        )
        outbox.record([event])
        deadline = time.monotonic() + 20
        while not outbox.dead:
            give_up_after(deadline, "a dead-lettered batch")
            await _tick()
        await outbox.stop()
    assert [(d.endpoint_url, [e.id for e in d.events]) for d in outbox.dead] == [
        (receiver.url, [event.id])
    ]
    assert "connection" in outbox.dead[0].error.lower() or "no answer" in outbox.dead[0].error


async def _tick() -> None:
    import asyncio

    await asyncio.sleep(0.01)  # polling interval


def test_an_endpoint_with_a_brand_gets_only_that_brands_events():
    acme = WebhookEndpoint("http://127.0.0.1:1/acme", SECRET, brand="acme")
    every = WebhookEndpoint("http://127.0.0.1:1/all", SECRET)
    assert endpoints_for([acme, every], "acme") == [acme, every]
    assert endpoints_for([acme, every], "other") == [every]
    assert endpoints_for([acme, every], "") == [every]


def test_events_travel_as_proto3_json_of_an_event_batch():
    event = new_event(
        ISSUED,
        time=datetime(2026, 11, 22, 5, 36, 32, 390769, tzinfo=UTC),
        campaign_id="80731ac8-6e2a-4471-91b8-6b3c06c8e20d",
        brand="acme",
        code="가나다라마0123",
        user_id="user-42",
    )
    decoded = coupon_pb.EventBatch.from_json(encode_batch([event]))
    assert [(e.id, e.type, e.brand, e.code, e.user_id, e.order_id) for e in decoded.events] == [
        (event.id, "coupon.issued", "acme", "가나다라마0123", "user-42", "")
    ]
    assert decoded.events[0].time.to_datetime() == event.time


KST = timezone(timedelta(hours=9))
NOW = datetime(2026, 11, 22, 5, 36, 32, 390769, tzinfo=UTC)
SAMPLE_EVENTS = [
    Event("id-1", ISSUED, NOW, "c-1", "", "가나다"),
    Event("id-2", ISSUED, NOW.replace(microsecond=0), "c-1", "acme", "k", "u"),
    Event("id-3", REDEEMED, NOW.replace(microsecond=123000), "c", "b", "k", "", "o"),
    Event("id-4", REDEMPTION_CANCELLED, datetime(2026, 1, 1, 9, 0, 0, 5, tzinfo=KST), "c", "", "k"),
    Event("id-5", ISSUED, datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "c", "", "k",
          'quote " backslash \\ tab \t nl \n nul \x00 < > & \u2028 é 😀', "o/ü"),
]  # fmt: skip


@pytest.mark.parametrize("events", [SAMPLE_EVENTS, SAMPLE_EVENTS[:1]])  # never empty
def test_the_batch_body_is_exactly_what_the_message_classes_write(events: list[Event]):
    by_messages = coupon_pb.EventBatch(
        events=[
            coupon_pb.Event(
                id=e.id,
                type=e.type,
                time=Timestamp.from_datetime(e.time),
                campaign_id=e.campaign_id,
                brand=e.brand,
                code=e.code,
                user_id=e.user_id,
                order_id=e.order_id,
            )
            for e in events
        ]
    )
    assert encode_batch(events) == by_messages.to_json().encode()


@pytest.mark.parametrize("change", ["가나다라마0123", "ABCDEFGH", "", "17", "é/ü"])
@pytest.mark.parametrize("event_type", [ISSUED, REDEEMED, REDEMPTION_CANCELLED])
def test_an_event_id_is_the_uuid5_of_its_change(event_type: str, change: str):
    expected = str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{event_type}/{change}"))
    assert event_id(event_type, change) == expected
    assert event_id(event_type, change) == event_id(event_type, change)  # a retry: same id


def test_event_ids_differ_between_changes_and_types():
    ids = {event_id(t, c) for t in (ISSUED, REDEEMED) for c in ("a", "b", "17", "18")}
    assert len(ids) == 8


def test_a_job_tells_list_dead_how_many_events_it_holds_and_when():
    at = "2026-11-22T05:36:32.390769+00:00"
    issued = {"endpoint": "u", "campaign_id": "c", "first_seq": 41, "last_seq": 72, "at": at}
    history = {"endpoint": "u", "history_ids": [7, 9], "at": at}
    earlier_build = {"endpoint": "u", "events": [{"id": "x", "time": at}, {"id": "y"}]}
    assert [batch_size(job) for job in (issued, history, earlier_build)] == [32, 2, 2]
    assert {batch_time(job) for job in (issued, history, earlier_build)} == {at}
    assert (batch_size({"endpoint": "u"}), batch_time({"endpoint": "u"})) == (0, "")


async def test_a_post_unanswered_within_the_timeout_fails():
    with Receiver(SECRET) as receiver:
        receiver.release.clear()  # the receiver holds every POST
        deliverer = Deliverer(0.3)
        event = new_event(ISSUED, time=datetime.now(UTC), campaign_id="c", brand="", code="k")
        # Without the timeout the POST would end with the receiver's 204 after its hold.
        with pytest.raises(DeliveryFailed, match="no answer"):
            await deliverer.post(WebhookEndpoint(receiver.url, SECRET), [event])
        receiver.release.set()
        await deliverer.aclose()
