"""Campaign stores: one protocol, several engines chosen by `store.type`."""

from __future__ import annotations

from coupon.store.base import Store

__all__ = ["Store"]
