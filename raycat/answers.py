"""Answer normalization shared by adapters, scoring and (later) teacher/eval extraction."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


def normalize_number(text: str) -> str | None:
    """Canonical form of the (last) number in ``text``: no thousands separators, units or trailing zeros.

    ``"$1,234.50"`` → ``"1234.5"``, ``"72.0"`` → ``"72"``, ``"-3"`` → ``"-3"``; None when there is no number.
    """
    found = _NUMBER.findall(text.replace("\u2212", "-"))
    if not found:
        return None
    raw = found[-1].replace(",", "")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


# --- chain-of-thought answers: the last well-formed [[...]] ---

_BRACKETS = re.compile(r"\[\[\s*(.*?)\s*\]\]", re.S)
_LETTER = re.compile(r"^\(?\s*(?:option\s+)?([A-Za-z])\s*\)?\.?$", re.I)


def extract_answer(text: str, n_options: int) -> str | None:
    """The answer in the last well-formed ``[[...]]`` of ``text``; None when there is none.

    Multiple choice (``n_options > 0``): a single option letter, tolerant of case, spaces,
    parentheses and a trailing period (``[[ (b) ]]`` → ``"B"``), and only letters that are options.
    Free-form: a number, normalized (``[[1,234.0 dollars]]`` → ``"1234"``). A placeholder echoed from
    the instruction (``[[LETTER]]``, ``[[NUMBER]]``) is not an answer and is skipped.
    """
    for raw in reversed(_BRACKETS.findall(text or "")):
        if n_options:
            m = _LETTER.match(raw)
            if m and "A" <= m.group(1).upper() < chr(ord("A") + n_options):
                return m.group(1).upper()
        else:
            if re.search(r"\d", raw):
                value = normalize_number(raw)
                if value is not None:
                    return value
    return None
