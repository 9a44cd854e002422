"""Answer parsing shared by the data adapters, scoring, the teacher's verification and eval.

Numbers are compared by value: ``canonical_number`` turns ``"1,234.0"``, ``"2.5e3"``, ``"-3/4"`` and
``"-0.75"`` into one spelling each. ``extract_answer`` is strict, because what it accepts becomes a
training target (teach) or a point of accuracy (eval): only the last ``[[...]]`` counts, an invalid one
is no answer (it never falls back to an earlier bracket), and brackets with different answers are a
hedge, not an answer.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation, localcontext
from fractions import Fraction

# An integer; thousands separators only in groups of three.
_INT = r"(?:\d{1,3}(?:,\d{3})+|\d+)"
# One number: sign, integer (or leading-dot decimal), decimals, exponent, or a simple fraction p/q.
# Not preceded by a word character or a dot, so "10-2" is two numbers and "x2" is none.
_NUMBER = re.compile(rf"(?<![\w.])[-+]?(?:{_INT}(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d{{1,4}})?(?:\s*/\s*{_INT})?")
# A longer canonical form is not a number a question asks for.
_MAX_DIGITS = 60


def canonical_number(token: str) -> str | None:
    """One number's canonical spelling: integers plain, terminating decimals in plain decimal notation
    without trailing zeros, other fractions as reduced ``p/q``. None when ``token`` is not one number."""
    cleaned = token.replace("\u2212", "-").replace(",", "").replace(" ", "")
    num, _, den = cleaned.partition("/")
    try:
        value = Fraction(Decimal(num))
        if den:
            divisor = Fraction(Decimal(den))
            if divisor == 0:
                return None
            value /= divisor
    except (InvalidOperation, ValueError):
        return None
    if value.denominator == 1:
        out = str(value.numerator)
    else:
        rest = value.denominator
        for p in (2, 5):
            while rest % p == 0:
                rest //= p
        if rest != 1:  # 1/3 has no exact decimal spelling
            out = f"{value.numerator}/{value.denominator}"
        else:
            with localcontext() as ctx:
                ctx.prec = 200
                out = format((Decimal(value.numerator) / Decimal(value.denominator)).normalize(), "f")
    return out if len(out) <= _MAX_DIGITS else None


def numbers(text: str) -> list[str]:
    """Every number token in ``text``, as written."""
    return _NUMBER.findall((text or "").replace("\u2212", "-"))


def parse_number(text: str) -> str | None:
    """The canonical value of the one number in ``text`` (units and words around it are ignored);
    None when ``text`` has no number or more than one (``"16 or 18"``, ``"10-2"``, ``"1,2"``)."""
    found = numbers(text)
    return canonical_number(found[0]) if len(found) == 1 else None


def normalize_number(text: str) -> str | None:
    """Canonical value of the last number in ``text`` (a student's short free-form answer, where the
    number may follow words); None when there is none."""
    found = numbers(text)
    return canonical_number(found[-1]) if found else None


# --- chain-of-thought answers: the last [[...]] ---

_BRACKETS = re.compile(r"\[\[\s*(.*?)\s*\]\]", re.S)
_LETTER = re.compile(r"^\(?\s*(?:option\s+)?([A-Za-z])\s*\)?\.?$", re.I)
# The instruction's own placeholders, echoed by a model after its answer: not an answer at all.
_PLACEHOLDERS = {"LETTER", "NUMBER"}


def _parse(raw: str, n_options: int) -> str | None:
    if n_options:
        letter = _LETTER.match(raw)
        if letter and "A" <= letter.group(1).upper() < chr(ord("A") + n_options):
            return letter.group(1).upper()
        return None
    return parse_number(raw)


def extract_answer(text: str, n_options: int) -> str | None:
    """The answer in the last ``[[...]]`` of ``text``; None when there is no valid one.

    Multiple choice (``n_options > 0``): one option letter, tolerant of case, spaces, parentheses,
    "option" and a trailing period (``[[ (b) ]]`` → ``"B"``); a letter that is not an option is invalid.
    Free-form: exactly one number, by value (``[[1,234.0 dollars]]`` → ``"1234"``, ``[[3/4]]`` →
    ``"0.75"``). An invalid last bracket is no answer; an earlier bracket with a different valid answer
    makes it a hedge (``[[A]] or [[B]]``): no answer. Echoed placeholders (``[[LETTER]]``) are ignored.
    """
    raws = [r for r in _BRACKETS.findall(text or "") if r.strip().upper() not in _PLACEHOLDERS]
    if not raws:
        return None
    last = _parse(raws[-1], n_options)
    if last is None:
        return None
    others = {v for v in (_parse(r, n_options) for r in raws[:-1]) if v is not None}
    return last if others <= {last} else None
