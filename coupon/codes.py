"""Coupon codes: 10 characters drawn from Hangul syllables and ASCII digits.

The alphabet is all 11,172 precomposed Hangul syllables (U+AC00..U+D7A3) plus the 10
digits, so one character carries log2(11182) ~ 13.4 bits and a code ~ 134 bits: far past the
64 bits needed to keep collisions negligible across every campaign ever run. Collisions are
still possible in principle, so stores keep codes unique and retry with a fresh one.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

CODE_LENGTH = 10
HANGUL_FIRST = 0xAC00
HANGUL_LAST = 0xD7A3
ALPHABET = "".join(chr(c) for c in range(HANGUL_FIRST, HANGUL_LAST + 1)) + "0123456789"
_ALPHABET_SET = frozenset(ALPHABET)

# Characters are drawn from random 16-bit numbers, each split into its high byte b and low byte
# lo. A high byte below 220 stands for b mod 44 (each of 0..43 five times), so (b mod 44) * 256
# + lo is uniform over 0..11263: below 11182 it is the alphabet index, the rest (with the high
# bytes 220..255, 15% of all numbers) is thrown away rather than folded in, which would favour
# some characters. Every character thus has exactly five of the 65536 numbers.
# The index is written as the code point U+AC00 + index (U+AC00 is a multiple of 256, so the
# high byte is 0xAC + b mod 44): Hangul syllables up to index 11171, then ten code points that
# stand for the digits until the page is done. None of them is a surrogate (all below U+D800).
_HANGUL_COUNT = HANGUL_LAST - HANGUL_FIRST + 1
_ALPHABET_HIGH_BYTES = (len(ALPHABET) + 255) // 256  # 44: the high bytes an index can have
_HIGH_BYTE_ACCEPTED_BELOW = (256 // _ALPHABET_HIGH_BYTES) * _ALPHABET_HIGH_BYTES
_REJECTED = 0xE0  # a high byte no alphabet code point has: U+E000..U+E0FF (private use)
_CODE_POINT_HIGH_BYTE = bytes(
    HANGUL_FIRST // 256 + b % _ALPHABET_HIGH_BYTES if b < _HIGH_BYTE_ACCEPTED_BELOW else _REJECTED
    for b in range(256)
)
_PAST_ALPHABET = re.compile(f"[{chr(HANGUL_FIRST + len(ALPHABET))}-\uffff]")
_DIGIT_STAND_INS = [(chr(HANGUL_FIRST + _HANGUL_COUNT + d), str(d)) for d in range(10)]
_RANDOM_BYTES_PER_REFILL = 8192  # ~3,500 characters: ~350 codes per system call


class CharacterStream:
    """Uniform, independent alphabet characters from a source of random bytes (the
    operating system's CSPRNG in production), made a page at a time.

    A code is a slice of the stream: ten independent uniform characters, so every code is
    equally likely. Mapping a page of numbers in one pass and slicing codes from it takes
    less than half the time of spelling each code out by big-integer arithmetic inside the
    server (new_code is on the hot path of every issuance)."""

    def __init__(self, random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self._random_bytes = random_bytes
        self._lock = threading.Lock()  # a store may draw from worker threads
        self._characters = ""
        self._position = 0

    def take(self, count: int) -> str:
        with self._lock:
            start = self._position
            while start + count > len(self._characters):
                self._characters = self._characters[start:] + self._page()
                start = 0
            self._position = start + count
            return self._characters[start : start + count]

    def _page(self) -> str:
        # A page at a time in C: bytes.translate maps every high byte at once, one decode makes
        # the characters, a regular expression drops the thrown-away ones and ten replaces
        # write the digits: about 300 instructions a character, where a Python expression per
        # number cost 1,300.
        numbers = bytearray(self._random_bytes(_RANDOM_BYTES_PER_REFILL))
        numbers[1::2] = numbers[1::2].translate(_CODE_POINT_HIGH_BYTE)  # little-endian pairs
        page = _PAST_ALPHABET.sub("", numbers.decode("utf-16-le"))
        for stand_in, digit in _DIGIT_STAND_INS:
            page = page.replace(stand_in, digit)
        return page

    def forget(self) -> None:
        """Drop what was drawn: a forked child must not hand out its parent's codes."""
        with self._lock:
            self._characters = ""
            self._position = 0


_stream = CharacterStream()
os.register_at_fork(after_in_child=_stream.forget)


# Return a fresh code, uniform over every possible code. A partial rather than a function of
# our own: on the hot path of every issuance, it runs no Python frame.
new_code: Callable[[], str] = functools.partial(_stream.take, CODE_LENGTH)


def is_code(text: str) -> bool:
    return len(text) == CODE_LENGTH and all(c in _ALPHABET_SET for c in text)
