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


_CODE_SPACE = len(ALPHABET) ** CODE_LENGTH


def new_code() -> str:
    """Return a fresh code from the operating system's CSPRNG.

    One uniform draw over all possible codes, spelt out in base len(ALPHABET): uniform per
    character like ten separate draws, at one system call instead of ten (it is on the hot path).
    """
    number = secrets.randbelow(_CODE_SPACE)
    chars = []
    for _ in range(CODE_LENGTH):
        number, index = divmod(number, len(ALPHABET))
        chars.append(ALPHABET[index])
    return "".join(chars)


def is_code(text: str) -> bool:
    return len(text) == CODE_LENGTH and all(c in _ALPHABET_SET for c in text)
