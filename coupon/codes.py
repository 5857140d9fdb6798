"""Coupon codes: 10 characters drawn from Hangul syllables and ASCII digits.

The alphabet is all 11,172 precomposed Hangul syllables (U+AC00..U+D7A3) plus the 10
digits, so one character carries log2(11182) ~ 13.4 bits and a code ~ 134 bits: far past the
64 bits needed to keep collisions negligible across every campaign ever run. Collisions are
still possible in principle, so stores keep codes unique and retry with a fresh one.
"""

from __future__ import annotations

import secrets

CODE_LENGTH = 10
HANGUL_FIRST = 0xAC00
HANGUL_LAST = 0xD7A3
ALPHABET = "".join(chr(c) for c in range(HANGUL_FIRST, HANGUL_LAST + 1)) + "0123456789"
_ALPHABET_SET = frozenset(ALPHABET)


def new_code() -> str:
    """Return a fresh code from the operating system's CSPRNG."""
    return "".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH))


def is_code(text: str) -> bool:
    return len(text) == CODE_LENGTH and all(c in _ALPHABET_SET for c in text)
