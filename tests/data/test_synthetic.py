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


def test_wrong_options_are_near_misses_and_the_last_digit_does_not_give_the_answer_away():
    rows = generate_arithmetic(400, 3, 4, seed=0, kinds=["add2", "add3", "sum3", "muladd"])
    unique_last_digit = 0
    for r in rows:
        answer = int(r["options"]["ABCD".index(r["gold"])])
        wrong = [int(o) for o in r["options"] if int(o) != answer]
        assert all(abs(w - answer) in (1, 2, 9, 10, 11, 20, 100) for w in wrong)
        unique_last_digit += sum(int(o) % 10 == answer % 10 for o in r["options"]) == 1
    # Carry slips share the last digit: picking the option with a unique last digit is no shortcut.
    assert unique_last_digit == 0


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
