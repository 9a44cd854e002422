"""Synthetic arithmetic multiple-choice questions with known difficulty (source 'synthetic').

Two generators, both clearly labelled ``source: synthetic``:

- the default: ``a + b`` with 1..max_digits operand digits, ``category`` = ``"2-digit"``, so a scoring
  run can check that entropy rises with difficulty (a demo and test aid);
- ``kinds``: named item types from one-step sums to multi-step expressions (``KINDS``), ``category`` =
  the kind. Every question is ``What is <expression>?`` over non-negative integers with ``+ - *``, and the
  wrong options are near misses (off by 1, 2, 9, 10, 11, 20 or 100, about half sharing the answer's
  last digit), so neither an option's size nor its last digit gives the answer away: the student has to
  compute. The method-effect study (jobs/studies/method-effect-cpu.yaml) uses them.
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
    """Wrong options close to the answer: carry slips (±10, ±100, sharing the last digit) and unit slips
    (±1, ±2, ±9, ±11, ±20), drawn half from each so the last digit does not single out the answer."""
    same_digit = [answer + d for d in (-10, 10, -20, 20, -100, 100)]
    other_digit = [answer + d for d in (-1, 1, -2, 2, -9, 9, -11, 11)]
    pools = [[c for c in pool if c >= 0] for pool in (same_digit, other_digit)]
    for pool in pools:
        rng.shuffle(pool)
    out: list[int] = []
    while len(out) < k and any(pools):
        for pool in pools:
            if pool and len(out) < k:
                out.append(pool.pop())
    return out


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
