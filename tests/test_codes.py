from __future__ import annotations

import collections
import math
import random
from array import array

from coupon.codes import ALPHABET, CODE_LENGTH, CharacterStream, is_code, new_code


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


def test_every_character_has_the_same_share_of_random_numbers() -> None:
    # Every 16-bit number once, in a shuffled order: each character must come out exactly
    # five times, and the other 9,626 numbers (65536 - 5 * 11182) must give none.
    numbers = list(range(65536))
    random.Random(7).shuffle(numbers)
    page = array("H", numbers).tobytes()
    assert len(page) == 2 * 65536

    def one_page(count: int) -> bytes:
        assert count == 8192
        nonlocal page
        chunk, page = page[:count], page[count:]
        return chunk

    stream = CharacterStream(one_page)
    drawn = stream.take(5 * len(ALPHABET))
    assert collections.Counter(drawn) == {c: 5 for c in ALPHABET}


def test_codes_are_consecutive_slices_that_never_repeat_a_character_drawn() -> None:
    source = random.Random(11)
    stream = CharacterStream(source.randbytes)
    reference = CharacterStream(random.Random(11).randbytes)
    codes = [stream.take(CODE_LENGTH) for _ in range(2_000)]  # several pages
    assert "".join(codes) == reference.take(CODE_LENGTH * 2_000)
    stream.forget()
    assert stream.take(CODE_LENGTH) != reference.take(CODE_LENGTH)  # starts on fresh bytes
