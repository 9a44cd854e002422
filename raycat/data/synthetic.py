"""Synthetic arithmetic multiple-choice questions with known difficulty (source 'synthetic').

Difficulty = number of operand digits, written into ``category`` (``"2-digit"``), so a scoring run can
check that entropy rises with difficulty. It is a demo and test aid, not a benchmark.
"""

from __future__ import annotations

import random

LETTERS = "ABCDEFGHIJ"


def _distractors(answer: int, digits: int, k: int, rng: random.Random) -> list[int]:
    # Near misses a model could plausibly produce: off-by-small, off-by-ten, digit slips.
    candidates = {answer + d for d in (-2, -1, 1, 2, -10, 10, -100, 100, 11, -11)}
    candidates |= {answer + rng.randint(-(10**digits), 10**digits) for _ in range(20)}
    candidates = sorted(c for c in candidates if c != answer and c >= 0)
    rng.shuffle(candidates)
    return candidates[:k]


def generate_arithmetic(num_questions: int, max_digits: int, num_options: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(num_questions):
        digits = 1 + i % max_digits
        lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        question, answer = f"What is {a} + {b}?", a + b
        options = [answer, *_distractors(answer, digits, num_options - 1, rng)]
        rng.shuffle(options)
        rows.append(
            {
                "id": f"synthetic-{seed}-{i}",
                "question": question,
                "options": [str(option) for option in options],
                "gold": LETTERS[options.index(answer)],
                "category": f"{digits}-digit",
                "source": "synthetic",
            }
        )
    return rows
