"""Webhooks: events written with the change they report, delivered signed, at least once.

events: the event values; signing: the Coupon-Signature header; delivery: one signed POST and
the retry schedule; memory_outbox / pg_outbox: where events wait (in process / in PostgreSQL
through procrastinate) and the loops that deliver them; runtime: which of those a config needs.
"""
