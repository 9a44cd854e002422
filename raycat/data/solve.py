"""A deterministic step-by-step solver for the synthetic arithmetic questions (``data.synthetic.kinds``).

It writes the chain of thought an oracle teacher gives (``engines.oracle``): products first, then left
to right, each operation split by place value the way one does it on paper, ending in ``[[LETTER]]``.
Pure string work; it only understands ``What is <integers joined by + - *>?``.
"""

from __future__ import annotations

import re

# In the oracle teacher's cache key: a change to the solutions' text must teach again.
SOLVER_VERSION = "solve-v1"
_QUESTION = re.compile(r"What is ([0-9+\-* ]+)\?(\s*Options:\s*\n.*)?", re.S)
_OPTION = re.compile(r"^([A-J])\. (-?\d+)\b", re.M)


def tokens(expression: str) -> list[int | str]:
    """``"7 * 8 + 12"`` -> ``[7, "*", 8, "+", 12]``; anything else is refused."""
    parts = expression.split()
    if len(parts) % 2 == 0 or not all(p.isdigit() for p in parts[::2]) or not all(o in "+-*" for o in parts[1::2]):
        raise ValueError(f"not a synthetic arithmetic expression: {expression!r}")
    return [int(p) if i % 2 == 0 else p for i, p in enumerate(parts)]


def value(expr: list[int | str]) -> int:
    return _run(expr, [])


def _run(expr: list[int | str], steps: list[str]) -> int:
    """Evaluate, appending one line per operation to ``steps``: products first, then left to right."""
    expr = list(expr)
    while "*" in expr:
        i = expr.index("*")
        expr[i - 1 : i + 2] = [_apply(expr[i - 1], "*", expr[i + 1], steps)]
    while len(expr) > 1:
        expr[0:3] = [_apply(expr[0], expr[1], expr[2], steps)]
    return int(expr[0])


def _places(n: int) -> list[int]:
    """347 -> [300, 40, 7] (zeros left out; 0 -> [0])."""
    digits = str(n)
    out = [int(d) * 10 ** (len(digits) - k - 1) for k, d in enumerate(digits) if d != "0"]
    return out or [0]


def _apply(a: int, op: str, b: int, steps: list[str]) -> int:
    if op == "+":
        result = a + b
        if a < 10 or b < 10:
            steps.append(f"{a} + {b} = {result}")
        else:
            pairs = [(x, y) for x, y in _by_place(a, b) if x or y]
            grouped = " + ".join(f"({x} + {y})" if x and y else str(x or y) for x, y in pairs)
            sums = " + ".join(str(x + y) for x, y in pairs)
            steps.append(f"{a} + {b} = {grouped} = {sums} = {result}")
    elif op == "-":
        result = a - b
        if b < 10:
            steps.append(f"{a} - {b} = {result}")
        else:
            parts, running, line = _places(b), a, [f"{a} - {b}"]
            line.append(" - ".join([str(a), *map(str, parts)]))
            for part in parts[:-1]:
                running -= part
                line.append(" - ".join([str(running), *map(str, parts[parts.index(part) + 1 :])]))
            line.append(str(result))
            steps.append(" = ".join(line))
    else:
        result = a * b
        big, small = (a, b) if a >= b else (b, a)
        parts = _places(big)
        if big < 10 or small >= 10 or len(parts) == 1:
            steps.append(f"{a} * {b} = {result}")
        else:
            products = " + ".join(f"{p} * {small}" for p in parts)
            steps.append(f"{a} * {b} = {products} = {' + '.join(str(p * small) for p in parts)} = {result}")
    return result


def _by_place(a: int, b: int) -> list[tuple[int, int]]:
    """Place values of a and b side by side, highest first: (996, 620) -> [(900, 600), (90, 20), (6, 0)]."""
    width = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(width), str(b).zfill(width)
    scale = [10 ** (width - k - 1) for k in range(width)]
    return [(int(x) * p, int(y) * p) for x, y, p in zip(da, db, scale, strict=True)]


def solution(question_text: str) -> str | None:
    """The oracle's answer to a rendered prompt holding ``What is ...?`` (the last such question in the
    text), multiple choice (lettered options follow) or free-form: numbered steps, the value, then
    ``[[LETTER]]`` or ``[[NUMBER]]``. None when the text holds no such question or no option equals the value."""
    found = list(_QUESTION.finditer(question_text))[-1:] or [None]
    found = found[0]
    if found is None:
        return None
    expression = found.group(1).strip()
    try:
        expr = tokens(expression)
    except ValueError:
        return None
    steps: list[str] = []
    result = _run(expr, steps)
    lines = [f"Step {k}: {step}." for k, step in enumerate(steps, 1)]
    if found.group(2) is None:
        return "\n".join([*lines, f"So {expression} = {result}.", f"[[{result}]]"])
    letters = [letter for letter, text in _OPTION.findall(found.group(2)) if int(text) == result]
    if not letters:
        return None
    lines.append(f"So {expression} = {result}, which is option {letters[0]}.")
    return "\n".join([*lines, f"[[{letters[0]}]]"])
