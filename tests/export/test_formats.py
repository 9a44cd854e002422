"""One trained conversation in each export format, and LLaMA-Factory's registry entries."""

from __future__ import annotations

import pytest

from raycat.data.prompts import train_messages
from raycat.export.formats import FORMATS, conversation, dataset_info, record


def test_the_conversation_is_the_trained_prompt_then_the_phase_target():
    answer = conversation("What is 2+2?", ["3", "4"], "math", "answer", "B", None)
    assert answer[:-1] == train_messages("What is 2+2?", ["3", "4"], "math", "answer")
    assert answer[-1] == {"role": "assistant", "content": "[[B]]"}
    cot = conversation("What is 2+2?", ["3", "4"], None, "cot", "B", "  2+2 is 4.\n[[B]]\n")
    assert cot[:-1] == train_messages("What is 2+2?", ["3", "4"], "", "cot")
    # Training strips the target before rendering it.
    assert cot[-1] == {"role": "assistant", "content": "2+2 is 4.\n[[B]]"}
    with pytest.raises(ValueError, match="non-empty target"):
        conversation("Q?", ["a", "b"], "", "cot", "A", None)


def test_each_format_holds_the_same_turns():
    messages = conversation("Q?", ["a", "b"], "", "cot", "A", "because [[A]]")
    system, user = messages[0]["content"], messages[1]["content"]
    assert record(messages, "messages") == {"messages": messages}
    assert record(messages, "sharegpt") == {
        "conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": "because [[A]]"}],
        "system": system,
    }
    assert record(messages, "alpaca") == {"instruction": user, "input": "", "output": "because [[A]]", "system": system}
    with pytest.raises(ValueError, match="unknown format"):
        record(messages, "chatml")
    with pytest.raises(ValueError, match="single-turn"):
        record(messages + messages[1:], "alpaca")


def test_dataset_info_entries_name_the_columns_each_format_has():
    messages = conversation("Q?", ["a", "b"], "", "answer", "A", None)
    for form in FORMATS:
        entry = dataset_info(f"x/{form}.jsonl", form)
        rec = record(messages, form)
        assert entry["file_name"] == f"x/{form}.jsonl"
        assert set(entry["columns"].values()) <= set(rec), form
        if entry["formatting"] == "sharegpt":
            turn = rec[entry["columns"]["messages"]][0]
            tags = entry.get("tags", {"role_tag": "from", "content_tag": "value"})
            assert {tags["role_tag"], tags["content_tag"]} <= set(turn)
