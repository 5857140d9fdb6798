"""Coupon codes: 10 characters drawn from Hangul syllables and ASCII digits.

The alphabet is all 11,172 precomposed Hangul syllables (U+AC00..U+D7A3) plus the 10
digits, so one character carries log2(11182) ~ 13.4 bits and a code ~ 134 bits: far past the
64 bits needed to keep collisions negligible across every campaign ever run. Collisions are
still possible in principle, so stores keep codes unique and retry with a fresh one.
"""

from __future__ import annotations

import os
import threading

CODE_LENGTH = 10
HANGUL_FIRST = 0xAC00
HANGUL_LAST = 0xD7A3
ALPHABET = "".join(chr(c) for c in range(HANGUL_FIRST, HANGUL_LAST + 1)) + "0123456789"
_ALPHABET_SET = frozenset(ALPHABET)


_CODE_SPACE = len(ALPHABET) ** CODE_LENGTH
_CODE_BITS = _CODE_SPACE.bit_length()
_CODE_BYTES = (_CODE_BITS + 7) // 8
_CODE_MASK = (1 << _CODE_BITS) - 1
_RANDOM_CHUNK = 4096


class _RandomBytes:
    """The operating system's CSPRNG, read a page at a time: one system call per ~240 codes
    instead of one or two per code (it is on the hot path). A process forked after a read
    starts over, so no two processes ever hand out the same bytes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._position = 0

    def take(self, count: int) -> bytes:
        with self._lock:
            start = self._position
            if start + count > len(self._buffer):
                self._buffer = os.urandom(max(_RANDOM_CHUNK, count))
                start = 0
            self._position = start + count
            return self._buffer[start : start + count]

    def forget(self) -> None:
        self._buffer = b""
        self._position = 0


_random = _RandomBytes()
os.register_at_fork(after_in_child=_random.forget)


def new_code() -> str:
    """Return a fresh code, uniform over every possible code.

    One draw over the whole code space, spelt out in base len(ALPHABET): uniform per character
    like ten separate draws. A draw past the space is thrown away, not folded into it, which
    would favour some codes.
    """
    while True:
        number = int.from_bytes(_random.take(_CODE_BYTES)) & _CODE_MASK
        if number < _CODE_SPACE:
            break
    chars = []
    for _ in range(CODE_LENGTH):
        number, index = divmod(number, len(ALPHABET))
        chars.append(ALPHABET[index])
    return "".join(chars)


def is_code(text: str) -> bool:
    return len(text) == CODE_LENGTH and all(c in _ALPHABET_SET for c in text)
