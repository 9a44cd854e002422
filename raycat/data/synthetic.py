"""Synthetic arithmetic multiple-choice questions with known difficulty (source 'synthetic').

Two generators, both clearly labelled ``source: synthetic``:

- the default: ``a + b`` with 1..max_digits operand digits, ``category`` = ``"2-digit"``, so a scoring
  run can check that entropy rises with difficulty (a demo and test aid);
- ``kinds``: named item types from one-step sums to multi-step expressions (``KINDS``), ``category`` =
  the kind. Every question is ``What is <expression>?`` over non-negative integers with ``+ - *``; the
  wrong options are near misses on a grid of carry and unit slips around the answer (``_near_misses``),
  so the student has to compute. The method-effect study (jobs/studies/method-effect-cpu.yaml) uses
  them free-form (``num_options: 0``).
"""

from __future__ import annotations

import random
from collections.abc import Callable

LETTERS = "ABCDEFGHIJ"


def _distractors(answer: int, digits: int, k: int, rng: random.Random) -> list[int]:
    # Near misses a model could plausibly produce: off-by-small, off-by-ten, digit slips.
    candidates = {answer + d for d in (-2, -1, 1, 2, -10, 10, -100, 100, 11, -11)}
    candidates |= {answer + rng.randint(-(10**digits), 10**digits) for _ in range(20)}
    candidates = sorted(c for c in candidates if c != answer and c >= 0)
    rng.shuffle(candidates)
    return candidates[:k]


def _near_misses(answer: int, k: int, rng: random.Random) -> list[int]:
    """k wrong options on a grid of slips around the answer: rows 10 apart (a carry slip) and columns 1
    apart (a unit slip), with the answer in a random cell. Last digits come in pairs and the answer's
    rank among the options is random, so neither size, last digit nor the middle option gives it away
    (tests/data/test_synthetic.py checks those rules stay at chance)."""
    columns, rows = (k + 2) // 2, 2 if k else 1
    # The answer's cell, drawn among those that keep every option non-negative.
    c0, r0 = rng.choice([(c, r) for c in range(columns) for r in range(rows) if answer - c - 10 * r >= 0])
    grid = [answer + (c - c0) + 10 * (r - r0) for c in range(columns) for r in range(rows)]
    wrong = [x for x in grid if x != answer]
    rng.shuffle(wrong)
    return wrong[:k]


def _num(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def _sub2(rng: random.Random) -> str:
    a, b = sorted((_num(rng, 2), _num(rng, 2)), reverse=True)
    return f"{a} - {b}"


# Item types, roughly by the steps a solution takes. Each returns an expression Python's precedence
# evaluates as written (only + - * on non-negative integers; intermediate values stay non-negative).
KINDS: dict[str, Callable[[random.Random], str]] = {
    "add1": lambda rng: f"{_num(rng, 1)} + {_num(rng, 1)}",
    "add2": lambda rng: f"{_num(rng, 2)} + {_num(rng, 2)}",
    "sub2": _sub2,
    "mul1": lambda rng: f"{rng.randint(2, 9)} * {rng.randint(2, 9)}",
    "add3": lambda rng: f"{_num(rng, 3)} + {_num(rng, 3)}",
    "mul21": lambda rng: f"{_num(rng, 2)} * {rng.randint(3, 9)}",
    "sum3": lambda rng: f"{_num(rng, 2)} + {_num(rng, 2)} + {_num(rng, 2)}",
    "muladd": lambda rng: f"{rng.randint(3, 9)} * {rng.randint(3, 9)} + {_num(rng, 2)}",
}


def _row(seed: int, i: int, question: str, answer: int, wrong: list[int], category: str, rng) -> dict:
    """A multiple-choice row; free-form (no options, gold = the number) when there are no wrong options."""
    options = [answer, *wrong] if wrong else []
    rng.shuffle(options)
    return {
        "id": f"synthetic-{seed}-{i}",
        "question": question,
        "options": [str(option) for option in options],
        "gold": LETTERS[options.index(answer)] if options else str(answer),
        "category": category,
        "source": "synthetic",
    }


def generate_arithmetic(
    num_questions: int, max_digits: int, num_options: int, seed: int, kinds: list[str] | None = None
) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(num_questions):
        if kinds:
            kind = kinds[i % len(kinds)]
            expression = KINDS[kind](rng)
            answer = evaluate(expression)
            wrong = _near_misses(answer, num_options - 1, rng) if num_options else []
            rows.append(_row(seed, i, f"What is {expression}?", answer, wrong, kind, rng))
            continue
        digits = 1 + i % max_digits
        lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        answer = a + b
        wrong = _distractors(answer, digits, num_options - 1, rng) if num_options else []
        rows.append(_row(seed, i, f"What is {a} + {b}?", answer, wrong, f"{digits}-digit", rng))
    return rows


def evaluate(expression: str) -> int:
    """The value of a ``KINDS`` expression: integers joined by `` + ``, `` - `` and `` * `` (products first)."""
    from raycat.data.solve import tokens, value

    return value(tokens(expression))
