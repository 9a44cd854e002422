from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raycat.data.answers import canonical_number, extract_answer, normalize_number, parse_number


@pytest.mark.parametrize(
    "text,expect",
    [
        ("so the answer is [[B]]", "B"),
        ("[[ b ]]", "B"),
        ("[[ (B) ]]", "B"),
        ("[[(c)]].", "C"),
        ("[[D.]]", "D"),
        ("[[Option A]]", "A"),
        ("[[B]] ... so, once more, [[B]]", "B"),  # the same answer twice is one answer
        ("[[C]]\n\nRemember: reply with [[LETTER]]", "C"),  # an echoed placeholder is not an answer
        ("first [[A]] then on reflection [[C]]", None),  # two answers: a hedge
        ("[[A]] or [[B]]", None),
        # E is not an option: invalid, no fall back to A
        ("[[A]] ... final: [[E]]", None),
        ("[[A or B]]", None),
        ("[[E]] is not an option here", None),
        ("[[AB]]", None),
        ("no brackets, answer B", None),
        ("[B]", None),
        ("[[ ]]", None),
        ("", None),
    ],
)
def test_extract_mcq(text, expect):
    assert extract_answer(text, 4) == expect


@pytest.mark.parametrize(
    "text,expect",
    [
        ("total [[1,234]]", "1234"),
        ("[[72.0]]", "72"),
        ("[[ $18 ]]", "18"),
        ("[[18 dollars]]", "18"),
        ("[[-3]]", "-3"),
        ("[[0.50]]", "0.5"),
        ("[[3/4]]", "0.75"),
        ("[[-3/4]]", "-0.75"),
        ("[[1/3]]", "1/3"),
        ("[[2.5e3]]", "2500"),
        ("[[12]] ... wait [[NUMBER]]", "12"),
        # Two numbers, not an expression to evaluate
        ("[[10-2]]", None),
        ("[[1,2]]", None),  # not a thousands separator: two numbers
        ("[[16 or 18]]", None),
        ("[[16]] or [[18]]", None),
        ("[[NUMBER]]", None),
        ("the answer is 5", None),
    ],
)
def test_extract_numeric(text, expect):
    assert extract_answer(text, 0) == expect


@pytest.mark.parametrize(
    "text,expect",
    [("1,000", "1000"), ("3.10", "3.1"), ("x", None), ("−7", "-7"), ("about 5 or 6", "6"), ("-3/4", "-0.75")],
)
def test_normalize_number_takes_the_last_number(text, expect):
    assert normalize_number(text) == expect


def test_parse_number_wants_exactly_one():
    assert parse_number("-3/4") == "-0.75" and parse_number("3 or 4") is None and parse_number("none") is None


# --- properties over generated completions ---

# Free text without digits, brackets or signs that could start a number.
words = st.text(st.sampled_from("abcdefghij klmnop QRSTUV\n,;:!?"), max_size=60)
letters4 = st.sampled_from("ABCD")


def spellings(value: Fraction) -> list[str]:
    """Ways to write ``value``: all must parse to one canonical value."""
    out = [f"{value.numerator}/{value.denominator}"]
    if value.denominator == 1:
        integer = value.numerator
        out += [str(integer), f"{integer:,}", f"{integer}.0", f"{Decimal(integer):E}".replace("E+", "e")]
    else:
        decimal = Decimal(value.numerator) / Decimal(value.denominator)
        if Fraction(decimal) == value:  # an exact decimal spelling exists
            out.append(format(decimal, "f"))
    return out


@given(
    st.fractions(min_value=-(10**6), max_value=10**6, max_denominator=40),
    words,
    st.sampled_from(["", " dollars", " km", "%", " apples"]),
)
def test_a_number_parses_to_one_value_however_it_is_written(v, cot, unit):
    want = canonical_number(f"{v.numerator}/{v.denominator}")
    for s in spellings(v):
        assert extract_answer(f"{cot}\n[[{s}{unit}]]", 0) == want, s


@given(words, letters4, letters4)
def test_two_different_bracketed_letters_are_a_hedge(cot, a, b):
    got = extract_answer(f"{cot} [[{a}]] {cot} [[{b}]]", 4)
    assert got == (a if a == b else None)


@given(words, letters4, st.sampled_from("EFGZ"))
def test_only_the_last_bracket_counts(cot, good, invalid):
    assert extract_answer(f"{cot}[[{good}]]\n{cot}", 4) == good
    assert extract_answer(f"{cot}[[{good}]]\n{cot}[[{invalid}]]", 4) is None


@given(st.integers(-(10**9), 10**9), st.integers(-(10**9), 10**9))
def test_two_numbers_in_one_bracket_are_never_an_answer(a, b):
    for sep in (" or ", " - ", ", ", " and "):
        assert extract_answer(f"[[{a}{sep}{b}]]", 0) is None
