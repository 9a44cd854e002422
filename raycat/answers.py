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
