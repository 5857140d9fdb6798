from __future__ import annotations

import math

from coupon.codes import ALPHABET, CODE_LENGTH, is_code, new_code


def test_alphabet_is_hangul_syllables_and_digits() -> None:
    assert len(ALPHABET) == 11_172 + 10
    assert len(set(ALPHABET)) == len(ALPHABET)
    assert all("\uac00" <= c <= "\ud7a3" or c in "0123456789" for c in ALPHABET)


def test_codes_carry_at_least_64_bits() -> None:
    assert CODE_LENGTH * math.log2(len(ALPHABET)) >= 64


def test_100k_codes_have_the_format_and_are_unique() -> None:
    codes = [new_code() for _ in range(100_000)]
    assert all(len(code) == 10 and is_code(code) for code in codes)
    assert len(set(codes)) == len(codes)
    used = set("".join(codes))
    # A uniform draw over 1M characters touches digits and nearly every syllable.
    assert set("0123456789") <= used
    assert len(used) > 11_000


def test_is_code_rejects_other_text() -> None:
    assert not is_code("abcdefghij")
    assert not is_code("가" * 9)
    assert not is_code("가" * 11)
    assert is_code("가나다라마바사아자1")
