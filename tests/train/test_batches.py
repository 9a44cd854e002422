"""Loss masks token by token for two chat-template families, over-long handling, and the recipes' rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from raycat.data.prompts import answer_target, train_messages
from raycat.recipes import NO_COT, RECIPES
from raycat.train.batches import IGNORE_INDEX, TemplateError, collate, encode, encode_rows, stop_token_ids


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def family(request, tiny_model_dir, tiny_llama3_dir):
    path = tiny_model_dir if request.param == "chatml" else tiny_llama3_dir
    tok = AutoTokenizer.from_pretrained(path)
    return request.param, tok, stop_token_ids(tok, str(path))


def _rows(n: int, with_target: bool = False) -> pd.DataFrame:
    rows = [
        {
            "id": f"q{i}",
            "question": f"What is {i} plus {i}?",
            "options": ["one", "two", "three", "four"],
            "gold": "ABCD"[i % 4],
            "category": "math" if i % 2 else "",
        }
        for i in range(n)
    ]
    df = pd.DataFrame(rows)
    if with_target:
        df["target"] = [f"Add them: {2 * i}. So the answer is [[{'ABCD'[i % 4]}]]" for i in range(n)]
    return df


def test_stop_ids_come_from_tokenizer_and_generation_config(family):
    name, tok, stops = family
    if name == "chatml":
        assert stops == {tok.convert_tokens_to_ids("<|im_end|>")}
    else:
        # Llama-3: EOS <|end_of_text|> and, from generation_config, <|eot_id|>.
        assert stops == {tok.convert_tokens_to_ids("<|end_of_text|>"), tok.convert_tokens_to_ids("<|eot_id|>")}


@pytest.mark.parametrize("kind", ["answer", "cot"])
def test_mask_covers_exactly_the_assistant_turn_and_its_stop_token(family, kind):
    name, tok, stops = family
    target = "[[C]]" if kind == "answer" else "First, 2 + 2 = 4.\nSo the answer is [[C]]"
    msgs = train_messages("What is 2 + 2?", ["1", "2", "4", "8"], "math", kind)
    enc = encode(tok, msgs, target, stops, max_length=512, overlong="drop")
    ids, labels = enc.input_ids, enc.labels
    assert len(ids) == len(labels)
    trained = [i for i, y in enumerate(labels) if y != IGNORE_INDEX]
    # Labels equal the inputs where trained (the model shifts them), and they form one contiguous span.
    assert all(labels[i] == ids[i] for i in trained)
    assert trained == list(range(trained[0], trained[-1] + 1))
    # Everything before the span is the prompt exactly as inference renders it.
    prompt_text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ids[: trained[0]] == tok(prompt_text, add_special_tokens=False)["input_ids"]
    # The span is the target followed by the end-of-turn token, which *is* trained.
    end = "<|im_end|>" if name == "chatml" else "<|eot_id|>"
    assert ids[trained[-1]] == tok.convert_tokens_to_ids(end)
    assert tok.decode([ids[i] for i in trained]) == target + end
    # What the template writes after the stop token (ChatML's newline) is not trained.
    tail = ids[trained[-1] + 1 :]
    assert tok.decode(tail) == ("\n" if name == "chatml" else "")
    if name == "llama3":
        assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>") and ids.count(ids[0]) == 1  # one BOS


def test_no_example_has_an_empty_mask(family):
    _, tok, stops = family
    for kind, rows in (("answer", _rows(12)), ("cot", _rows(12, with_target=True))):
        enc, skipped = encode_rows(tok, rows, kind, stops, max_length=512, overlong="drop")
        assert len(enc) == 12 and len(skipped) == 0
        # At least one answer token plus the stop token.
        assert (enc["num_target_tokens"] >= 2).all()


def test_overlong_rows_are_dropped_or_truncated_and_counted(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    stops = stop_token_ids(tok, str(tiny_model_dir))
    rows = _rows(4, with_target=True)
    rows.loc[1, "target"] = "step " * 200 + "[[B]]"
    full, _ = encode_rows(tok, rows, "cot", stops, max_length=4096, overlong="drop")
    limit = int(full["num_tokens"].iloc[[0, 2, 3]].max()) + 5
    enc, skipped = encode_rows(tok, rows, "cot", stops, max_length=limit, overlong="drop")
    assert list(skipped["id"]) == ["q1"] and "over max_length" in skipped["skip_reason"].iloc[0]
    assert list(enc["id"]) == ["q0", "q2", "q3"]
    enc, skipped = encode_rows(tok, rows, "cot", stops, max_length=limit, overlong="truncate")
    assert len(skipped) == 0 and enc["truncated"].tolist() == [False, True, False, False]
    assert enc.loc[1, "num_tokens"] == limit and enc.loc[1, "num_target_tokens"] > 0
    # A prompt that fills the whole budget leaves nothing to learn: skipped with that reason.
    prompt_len = next(i for i, y in enumerate(full["labels"].iloc[0]) if y != IGNORE_INDEX)
    enc, skipped = encode_rows(tok, rows.iloc[[0]], "cot", stops, max_length=prompt_len, overlong="truncate")
    assert len(enc) == 0 and "no target token left" in skipped["skip_reason"].iloc[0]


def test_template_without_a_stop_token_is_an_error_naming_the_row(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(TemplateError, match=r"row 'q0'.*never learn to stop"):
        encode_rows(tok, _rows(1), "answer", {tok.convert_tokens_to_ids("<|im_end|>")}, 512, "drop")


def test_answer_target_is_what_the_eval_extracts():
    from raycat.data.answers import extract_answer

    assert extract_answer(answer_target("C"), 4) == "C"
    assert extract_answer(answer_target("42"), 0) == "42"


def test_collate_pads_right_and_masks_padding():
    b = collate([[5, 6, 7], [8]], [[-100, 6, 7], [8]], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# --- recipes: which rows each phase trains on ---


def _select(tmp_path, recipe: str, cot_ids, seed: int = 0):
    """(phase, rows, ids skipped for want of a CoT) per phase, through the band files as training reads them."""
    from raycat.recipes import phase_sources
    from raycat.storage import rowkey, rundir
    from raycat.train.examples import phase_rows

    ids = {"easy": range(0, 3), "medium": range(3, 9), "hard": range(9, 12)}
    paths = {}
    for band, r in ids.items():
        rows = rowkey.add(_rows(12).iloc[list(r)])
        paths[band] = str(tmp_path / f"{band}.parquet")
        rundir.write_parquet(paths[band], rows)
    cot = rowkey.add(_rows(12, with_target=True)).iloc[list(cot_ids)][["id", "row_hash", "target"]]
    cot_path = str(tmp_path / "cot.parquet")
    rundir.write_parquet(cot_path, cot)
    sizes = {b: len(r) for b, r in ids.items()}
    out = []
    for phase, bands, keep in phase_sources(recipe, sizes, seed):
        parts = list(phase_rows(phase, [paths[b] for b in bands], keep, cot_path, batch_rows=5))
        rows = pd.concat([p[0] for p in parts], ignore_index=True)
        out.append((phase, rows, [i for p in parts for i in p[1]["id"]]))
    return out


def _ids(df):
    return sorted(df["id"], key=lambda s: int(s[1:]))


def test_complexity_aware_trains_answers_on_easy_medium_then_cot_on_hard(tmp_path):
    (p1, r1, s1), (p2, r2, s2) = _select(tmp_path, "complexity_aware", [9, 10])
    assert (p1.name, p1.target, _ids(r1), s1) == ("phase1", "answer", [f"q{i}" for i in range(9)], [])
    assert (p2.name, p2.target, _ids(r2)) == ("phase2", "cot", ["q9", "q10"])
    assert r2.set_index("id")["target"]["q10"] == "Add them: 20. So the answer is [[C]]"
    assert s2 == ["q11"] and NO_COT.startswith("no teacher CoT")


def test_baselines_select_their_rows(tmp_path):
    sft = _select(tmp_path, "sft_all", [])
    assert len(sft) == 1 and sft[0][0].target == "answer" and len(sft[0][1]) == 12
    distill = _select(tmp_path, "distill_all", range(12))
    assert len(distill) == 1 and distill[0][0].target == "cot" and len(distill[0][1]) == 12 and not distill[0][2]
    cur = _select(tmp_path, "curriculum", [])
    assert [(p.name, p.target, len(r)) for p, r, _ in cur] == [
        ("phase1", "answer", 3),
        ("phase2", "answer", 6),
        ("phase3", "answer", 3),
    ]
    assert _ids(cur[0][1]) == ["q0", "q1", "q2"] and _ids(cur[2][1]) == ["q9", "q10", "q11"]


def test_random_split_keeps_band_sizes_with_random_disjoint_rows(tmp_path):
    (_, r1, _), (_, r2, s2) = _select(tmp_path, "random_split", range(12), seed=1)
    assert len(r1) == 9 and len(r2) == 3 and not s2
    assert not set(r1["id"]) & set(r2["id"]) and set(r1["id"]) | set(r2["id"]) == {f"q{i}" for i in range(12)}
    # Seed 1 does not happen to pick the hard band.
    assert set(r2["id"]) != {"q9", "q10", "q11"}
    again = _select(tmp_path, "random_split", range(12), seed=1)
    assert list(again[1][1]["id"]) == list(r2["id"])  # seeded
    assert set(RECIPES) == {"complexity_aware", "sft_all", "distill_all", "curriculum", "random_split"}


def test_accumulated_window_loss_weighs_every_target_token_like_one_big_batch():
    """Two micro-batches of very different target lengths (a short answer, a long CoT) accumulated as
    one window give the gradient of one batch holding both; a mean of per-micro-batch means does not."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raycat.train.batches import collate, target_tokens, total_steps, window_loss

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = LlamaForCausalLM(cfg).float()
    short_ids = list(range(3, 13))
    short_lab = [-100] * 7 + short_ids[7:]  # 3 target tokens
    long_ids = list(range(5, 45))
    long_lab = [-100] * 4 + long_ids[4:]  # 36 target tokens

    def t(d):
        return {k: torch.from_numpy(v) for k, v in d.items()}

    micro = [t(collate([short_ids], [short_lab], 0)), t(collate([long_ids], [long_lab], 0))]
    both = t(collate([short_ids, long_ids], [short_lab, long_lab], 0))

    def grads(loss_fn):
        model.zero_grad()
        loss_fn()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    # Mean over all target tokens of the window.
    reference = grads(lambda: model(**both).loss.backward())
    n = sum(target_tokens(b["labels"]) for b in micro)
    assert n == 3 + 36

    def window():
        for b in micro:
            window_loss(model, b, n, world=1)[0].backward()

    torch.testing.assert_close(grads(window), reference, atol=1e-6, rtol=1e-4)

    # The old accumulation: each micro-batch's mean loss / accumulation steps.
    def mean_of_means():
        for b in micro:
            (model(**b).loss / len(micro)).backward()

    assert not torch.allclose(grads(mean_of_means), reference, atol=1e-4)
    # The data-parallel all-reduce averages over ranks; the loss share is scaled up to undo it.
    assert window_loss(model, micro[0], n, world=4)[0].item() == pytest.approx(
        4 * window_loss(model, micro[0], n, 1)[1].item()
    )
    # Steps per epoch: the last, shorter window is a step too (5 micro-batches, 2 per window -> 3 steps).
    assert total_steps(rows=20, world=1, micro_batch_size=4, accumulation=2, epochs=2, max_steps=None) == 6


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_micro_batch_trains_exactly_like_the_padded_one(attn):
    """Three examples of different lengths, packed into one row (position ids restarting per example)
    vs right-padded: same target tokens, same loss, same gradients; the packed row has no padding. Run
    unpacked-but-concatenated (no position ids) as the control: the examples then see each other."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raycat.train.batches import collate, pack, target_tokens, window_loss

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = LlamaForCausalLM(cfg).float()
    model.config._attn_implementation = attn
    # As training loads it (a cache turns off the packed-sequence mask).
    model.config.use_cache = False
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, 64, n).tolist() for n in (9, 23, 14)]
    labels = [[-100] * p + x[p:] for x, p in zip(ids, (4, 20, 6), strict=True)]

    def t(d):
        return {k: torch.from_numpy(v) for k, v in d.items()}

    padded, packed = t(collate(ids, labels, 0)), t(pack(ids, labels))
    assert packed["input_ids"].shape == (1, 9 + 23 + 14)
    assert packed["position_ids"][0].tolist() == list(range(9)) + list(range(23)) + list(range(14))
    n = target_tokens(padded["labels"])
    assert n == target_tokens(packed["labels"]) == 5 + 3 + 8

    def run(batch):
        model.zero_grad()
        loss = window_loss(model, batch, n, world=1)[0]
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    (loss_pad, g_pad), (loss_pack, g_pack) = run(padded), run(packed)
    torch.testing.assert_close(loss_pack, loss_pad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_pack, g_pad, atol=1e-6, rtol=1e-4)
    leaky = dict(packed)
    del leaky["position_ids"]
    assert not torch.allclose(run(leaky)[0], loss_pad, atol=1e-4)


def test_length_groups_make_micro_batches_of_similar_length_in_shuffled_order():
    from raycat.train.batches import length_groups

    lengths = [50, 10, 40, 11, 52, 12, 41, 9]
    order = length_groups(lengths, 2, seed=0)
    assert sorted(order) == list(range(8))  # every example once
    runs = [sorted(lengths[i] for i in order[k : k + 2]) for k in range(0, 8, 2)]
    assert sorted(runs) == [[9, 10], [11, 12], [40, 41], [50, 52]]
    # Deterministic: resume skips the same batches.
    assert order == length_groups(lengths, 2, seed=0)
