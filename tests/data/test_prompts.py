from raycat.data.prompts import (
    PROMPT_VERSION,
    generation_context,
    label_tokens,
    messages_for,
    option_labels,
    render_ids,
    template_hash,
)


def test_letter_and_paper_presets():
    m = messages_for("Q?", ["x", "y", "z"], "law", "letters")
    assert m[0]["content"].startswith("The following is a multiple choice question about law.")
    assert m[1]["content"] == "Question: Q?\nOptions:\nA. x\nB. y\nC. z"
    p = messages_for("Q?", ["x", "y"], "law", "paper")
    assert "otherwise return 0" in p[0]["content"] and "otherwise return 0" in p[1]["content"]
    assert "1. x\n2. y" in p[1]["content"]
    assert option_labels(3, "paper") == ["1", "2", "3"]


def test_free_form_prompt_has_no_options():
    m = messages_for("How many?", [], "gsm8k", "letters")
    assert m[1]["content"] == "How many?" and "final number" in m[0]["content"]


def test_render_uses_the_models_own_chat_template(tiny_tokenizer):
    ids = render_ids(tiny_tokenizer, messages_for("Q?", ["x", "y"], "", "letters"))
    text = tiny_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert text.count("<|im_start|>") == 3  # no extra BOS from add_special_tokens


def test_template_hash_changes_with_template_and_preset(tiny_tokenizer):
    letters_hash = template_hash(tiny_tokenizer, "letters", None)
    assert letters_hash == template_hash(tiny_tokenizer, "letters", None)
    assert letters_hash != template_hash(tiny_tokenizer, "paper", None)
    assert letters_hash != template_hash(tiny_tokenizer, "letters", "Custom {subject}")
    saved = tiny_tokenizer.chat_template
    try:
        tiny_tokenizer.chat_template = saved + " "
        assert letters_hash != template_hash(tiny_tokenizer, "letters", None)
    finally:
        tiny_tokenizer.chat_template = saved
    assert PROMPT_VERSION


def test_label_tokens_detect_multi_token_labels(tiny_tokenizer):
    letters = label_tokens(tiny_tokenizer, 10, "letters")
    assert letters.multi_token == () and set(letters.ids) == set("ABCDEFGHIJ")
    assert letters.groups(4, "letters") == [list(letters.ids[c]) for c in "ABCD"]
    # The tiny tokenizer splits digits (as Qwen's does): "10" is two tokens, so the paper preset's
    # 10th option cannot be scored as one token. It must be reported, not mis-scored as "1".
    paper = label_tokens(tiny_tokenizer, 10, "paper")
    assert paper.multi_token == ("10",)
    assert paper.groups(10, "paper") is None
    assert paper.groups(9, "paper")[-1] == list(paper.ids["0"])  # IDK label appended last


def test_braces_in_a_category_are_text_and_only_the_user_prompt_has_a_subject_slot():
    m = messages_for("q?", ["a", "b"], "set {x} theory", "letters")
    assert "about set {x} theory" in m[0]["content"]
    m = messages_for("q?", ["a", "b"], "law {", "paper", system_prompt="Questions on {subject} {{x}}.")
    assert m[0]["content"] == "Questions on law { {x}."


def sentencepiece_style_tokenizer():
    """A Unigram tokenizer with a Metaspace pre-tokenizer, as SentencePiece models (Llama-2, Mistral,
    Gemma) are converted: "A" alone becomes "▁A", but "A" after a newline is the bare "A"."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_letters + string.digits + " .,:?!\n<>|_/[]()'\"-")
    vocab = [("<unk>", 0.0)] + [(c, -5.0) for c in chars] + [("▁", -3.0)]
    vocab += [("▁" + c, -2.0) for c in string.ascii_letters + string.digits]
    tk = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<unk>")
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<model>\n{% endif %}"
    )
    return tok


def test_label_tokens_include_the_in_context_spelling_of_sentencepiece_tokenizers():
    tok = sentencepiece_style_tokenizer()
    alone = label_tokens(tok, 4, "letters")
    assert tok.convert_ids_to_tokens(list(alone.ids["A"])) == ["▁A"]  # what encode("A") gives
    ctx = generation_context(tok, "letters", None)
    labels = label_tokens(tok, 4, "letters", ctx)
    assert tok.convert_ids_to_tokens(list(labels.ids["A"])) == ["▁A", "A"]
    # ... and "A" is indeed the token a rendered prompt is continued with.
    prompt = render_ids(tok, messages_for("Which?", ["x", "y", "z", "w"], "", "letters"))
    answered = tok(tok.decode(prompt) + "A", add_special_tokens=False)["input_ids"]
    assert answered[: len(prompt)] == prompt and answered[-1] in labels.ids["A"]
    # The options distribution missed the model's answer
    assert answered[-1] not in alone.ids["A"]


def test_an_answer_prefix_ends_the_prompt_and_enters_the_hash_only_when_set(tiny_tokenizer):
    from raycat.data.prompts import generation_context, render_ids

    messages = messages_for("What is 2 + 2?", [], "", "letters")
    plain, prefixed = render_ids(tiny_tokenizer, messages), render_ids(tiny_tokenizer, messages, None, "The answer is ")
    assert tiny_tokenizer.decode(prefixed).endswith("<|im_start|>assistant\nThe answer is ")
    assert prefixed[: len(plain)] == plain and len(prefixed) > len(plain)
    # Unset, the hash is the one every existing cache was keyed by.
    assert template_hash(tiny_tokenizer, "letters", None, None, "") == template_hash(tiny_tokenizer, "letters", None)
    assert template_hash(tiny_tokenizer, "letters", None, None, "The answer is ") != template_hash(
        tiny_tokenizer, "letters", None
    )
    assert generation_context(tiny_tokenizer, "letters", None, None, "Answer: ").endswith("assistant\nAnswer: ")
