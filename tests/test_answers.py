import pytest

from raycat.answers import extract_answer, normalize_number


@pytest.mark.parametrize(
    "text,expect",
    [
        ("so the answer is [[B]]", "B"),
        ("[[ b ]]", "B"),
        ("[[ (B) ]]", "B"),
        ("[[(c)]].", "C"),
        ("[[D.]]", "D"),
        ("[[Option A]]", "A"),
        ("first [[A]] then on reflection [[C]]", "C"),
        ("final: [[C]] and an echo of the format [[LETTER]]", "C"),
        ("[[C]]\n\nRemember: reply with [[LETTER]]", "C"),
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
        ("[[12]] ... wait [[NUMBER]]", "12"),
        ("[[NUMBER]]", None),
        ("the answer is 5", None),
    ],
)
def test_extract_numeric(text, expect):
    assert extract_answer(text, 0) == expect


@pytest.mark.parametrize(
    "text,expect", [("1,000", "1000"), ("3.10", "3.1"), ("x", None), ("−7", "-7"), ("about 5 or 6", "6")]
)
def test_normalize_number(text, expect):
    assert normalize_number(text) == expect
