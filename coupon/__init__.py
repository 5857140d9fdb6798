"""First-come-first-served coupon campaigns over the Connect protocol."""
