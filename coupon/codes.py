"""Coupon codes: 10 characters drawn from Hangul syllables and ASCII digits.

The alphabet is all 11,172 precomposed Hangul syllables (U+AC00..U+D7A3) plus the 10
digits, so one character carries log2(11182) ~ 13.4 bits and a code ~ 134 bits: far past the
64 bits needed to keep collisions negligible across every campaign ever run. Collisions are
still possible in principle, so stores keep codes unique and retry with a fresh one.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from array import array
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

CODE_LENGTH = 10
HANGUL_FIRST = 0xAC00
HANGUL_LAST = 0xD7A3
ALPHABET = "".join(chr(c) for c in range(HANGUL_FIRST, HANGUL_LAST + 1)) + "0123456789"
_ALPHABET_SET = frozenset(ALPHABET)

# Characters are drawn from random 16-bit numbers: the first 5 * 11182 of the 65536 values
# stand for one character each (value mod 11182), so every character has exactly five; the
# rest (15%) are thrown away rather than folded in, which would favour some characters.
_HANGUL_COUNT = HANGUL_LAST - HANGUL_FIRST + 1
_ACCEPTED_BELOW = (65536 // len(ALPHABET)) * len(ALPHABET)
_DIGIT_OFFSET = ord("0") - _HANGUL_COUNT  # alphabet index 11172 is "0"
_UTF16 = "utf-16-le" if sys.byteorder == "little" else "utf-16-be"  # array's own byte order
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
        # Code points by arithmetic, then one decode: a lookup table of the alphabet's
        # characters was as fast in a loop of its own, but 5x slower inside the server, where
        # its megabyte of objects is never in the CPU's cache.
        size, hangul, first, digit = len(ALPHABET), _HANGUL_COUNT, HANGUL_FIRST, _DIGIT_OFFSET
        code_points = array(
            "H",
            [
                first + index if (index := number % size) < hangul else digit + index
                for number in array("H", self._random_bytes(_RANDOM_BYTES_PER_REFILL))
                if number < _ACCEPTED_BELOW
            ],
        )
        return code_points.tobytes().decode(_UTF16)

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
