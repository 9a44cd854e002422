"""One training row as the peers' formats hold it: OpenAI-style chat ``messages`` (TRL's SFTTrainer and
``datasets`` read it as is), ShareGPT and Alpaca (LLaMA-Factory, axolotl), and the
``dataset_info.json`` entry that registers each with LLaMA-Factory. Pure.

The conversation is the one the student was trained on: ``prompts.train_messages`` (the system and
user turns training and evaluation render) and the phase's target as the assistant turn: the bare
answer ``[[X]]`` for an answer phase, the teacher's verified CoT for a CoT phase.
"""

from __future__ import annotations

from raycat.data.prompts import answer_target, train_messages

FORMATS = ("messages", "sharegpt", "alpaca")
_SHAREGPT_ROLE = {"user": "human", "assistant": "gpt"}


def conversation(question: str, options, category: str | None, kind: str, gold: str, cot: str | None) -> list[dict]:
    """The trained conversation of one row; ``kind`` is the phase's target ('answer' or 'cot')."""
    target = answer_target(gold) if kind == "answer" else cot
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"a {kind} conversation needs a non-empty target, got {target!r}")
    # Training strips the target (batches._texts): the exported turn is the trained text.
    prompt = train_messages(question, list(options) if options is not None else [], category or "", kind)
    return [*prompt, {"role": "assistant", "content": target.strip()}]


def _parts(messages: list[dict]) -> tuple[str, str, str]:
    """(system, user, assistant) of a single-turn conversation."""
    by_role = {m["role"]: m["content"] for m in messages}
    if len(messages) != len(by_role) or set(by_role) - {"system", "user", "assistant"}:
        raise ValueError(f"a single-turn conversation has one system, user and assistant turn each: {messages}")
    return by_role.get("system", ""), by_role["user"], by_role["assistant"]


def record(messages: list[dict], form: str) -> dict:
    """One row in format ``form`` (``FORMATS``)."""
    if form == "messages":
        return {"messages": messages}
    system, user, assistant = _parts(messages)
    if form == "sharegpt":
        turns = [{"from": _SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in messages if m["role"] != "system"]
        return {"conversations": turns, "system": system}
    if form == "alpaca":
        return {"instruction": user, "input": "", "output": assistant, "system": system}
    raise ValueError(f"unknown format {form!r}; one of {', '.join(FORMATS)}")


def dataset_info(file_name: str, form: str) -> dict:
    """LLaMA-Factory's ``dataset_info.json`` entry for a file of ``form`` records (its data/README)."""
    if form == "messages":
        tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
        return {
            "file_name": file_name,
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {**tags, "system_tag": "system"},
        }
    if form == "sharegpt":
        return {
            "file_name": file_name,
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "system": "system"},
        }
    if form == "alpaca":
        columns = {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}
        return {"file_name": file_name, "formatting": "alpaca", "columns": columns}
    raise ValueError(f"unknown format {form!r}; one of {', '.join(FORMATS)}")
