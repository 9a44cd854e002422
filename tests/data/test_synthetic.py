"""The synthetic item types (data.synthetic.kinds) and the oracle's step-by-step solver (data.solve)."""

from __future__ import annotations

import re

import pytest

from raycat.config import ConfigError, DataConfig, RaycatConfig, validate_config
from raycat.data.solve import solution, tokens, value
from raycat.data.synthetic import KINDS, evaluate, generate_arithmetic


def _prompt(row: dict) -> str:
    """The user turn as raycat renders it (prompts.teach_messages), inside chat-template markers."""
    body = "".join(f"\n{letter}. {option}" for letter, option in zip("ABCDEFGHIJ", row["options"], strict=False))
    options = f"\nOptions:{body}" if row["options"] else ""
    return f"<|im_start|>user\nQuestion: {row['question']}{options}<|im_end|>\n<|im_start|>assistant\n"


def test_kinds_cycle_with_categories_and_the_gold_is_the_expression_value():
    kinds = list(KINDS)
    rows = generate_arithmetic(80, 3, 4, seed=3, kinds=kinds)
    assert [r["category"] for r in rows[:8]] == kinds and rows == generate_arithmetic(80, 3, 4, 3, kinds)
    for r in rows:
        expression = r["question"].removeprefix("What is ").removesuffix("?")
        answer = eval(expression)  # noqa: S307 (digits and + - * only, checked by tokens below)
        tokens(expression)
        assert evaluate(expression) == answer >= 0
        assert r["options"]["ABCD".index(r["gold"])] == str(answer)
        assert len(set(r["options"])) == 4 and all(int(o) >= 0 for o in r["options"])


@pytest.mark.parametrize("num_options", [2, 3, 4, 6, 10])
def test_wrong_options_are_near_misses_and_no_shortcut_finds_the_answer(num_options):
    from collections import Counter

    rows = generate_arithmetic(3000, 3, num_options, seed=0, kinds=list(KINDS))
    hits = Counter()
    for r in rows:
        options = [int(o) for o in r["options"]]
        answer = options["ABCDEFGHIJ".index(r["gold"])]
        assert len(set(options)) == num_options and min(options) >= 0
        # Carry slips (rows 10 apart) and unit slips (columns 1 apart) around the answer.
        columns = (num_options + 1) // 2
        assert all(any(abs(o - answer - 10 * row) < columns for row in (-1, 0, 1)) for o in options)
        digits = Counter(o % 10 for o in options)
        ranked = sorted(options)
        majority = sorted(o for o in options if digits[o % 10] == max(digits.values()))
        hits["middle option"] += ranked[len(ranked) // 2] == answer
        hits["middle of the majority last digit"] += majority[len(majority) // 2] == answer
        hits["the only option with its last digit"] += [o for o in options if digits[o % 10] == 1] == [answer]
    # Each rule finds the answer no more often than a guess would (3000 rows: a few points of noise).
    for rule, n in hits.items():
        assert n / len(rows) < 1 / num_options + 0.04, (rule, n / len(rows))


def test_free_form_rows_carry_the_number_as_gold():
    rows = generate_arithmetic(16, 3, 0, seed=1, kinds=["muladd", "sub2"])
    assert all(r["options"] == [] and r["gold"] == str(evaluate(r["question"][8:-1])) for r in rows)
    default = generate_arithmetic(6, 2, 0, seed=1)
    assert all(r["options"] == [] and r["category"].endswith("-digit") for r in default)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("num_options", [4, 0])
def test_the_solver_is_right_and_every_step_is_true_arithmetic(kind, num_options):
    for row in generate_arithmetic(24, 3, num_options, seed=7, kinds=[kind]):
        text = solution(_prompt(row))
        assert text is not None and text.endswith(f"[[{row['gold']}]]")
        steps = [line.split(": ", 1)[1].rstrip(".") for line in text.splitlines() if line.startswith("Step ")]
        assert steps
        for step in steps:
            # "37 + 48 = (30 + 40) + (7 + 8) = 70 + 15 = 85": every side has the same value.
            sides = {eval(side) for side in step.split(" = ")}  # noqa: S307 (digits, + - * and brackets)
            assert len(sides) == 1, step
        assert value(tokens(row["question"][8:-1])) == eval(row["question"][8:-1])  # noqa: S307


def test_the_solver_names_the_matching_option_and_refuses_what_it_cannot_solve():
    text = solution("Question: What is 7 * 3 + 72?\nOptions:\nA. 93\nB. 83<|im_end|>")
    assert text.splitlines()[:2] == ["Step 1: 7 * 3 = 21.", "Step 2: 21 + 72 = (20 + 70) + (1 + 2) = 90 + 3 = 93."]
    assert text.endswith("which is option A.\n[[A]]")
    assert solution("What is 91 - 88?") == "Step 1: 91 - 88 = 91 - 80 - 8 = 11 - 8 = 3.\nSo 91 - 88 = 3.\n[[3]]"
    assert solution("Question: What is the capital of France?\nOptions:\nA. Paris") is None
    assert solution("Question: What is 2 + 2?\nOptions:\nA. 5\nB. 3") is None  # no option holds the value
    with pytest.raises(ValueError, match="not a synthetic arithmetic expression"):
        tokens("2 / 2")


def test_config_refuses_one_option_and_options_entropy_on_free_form_synthetic():
    with pytest.raises(ValueError, match="num_options: 0 .free-form. or 2..10"):
        DataConfig(source="synthetic", synthetic={"num_options": 1})
    tree = {"data": {"source": "synthetic", "synthetic": {"num_options": 0}}, "score": {"student": {"path": "m"}}}
    with pytest.raises(ConfigError, match=re.escape("'options' needs multiple-choice questions and synthetic")):
        validate_config(tree)
    tree["score"]["entropy_mode"] = "full"
    assert isinstance(validate_config(tree), RaycatConfig)
    with pytest.raises(ConfigError, match="synthetic.kinds"):
        validate_config({**tree, "data": {"source": "synthetic", "synthetic": {"kinds": ["add9"]}}})
