"""The oracle teacher backend: a solver behind the Generator interface, its tokens counted by a real
tokenizer, labelled and cached apart from the model whose tokenizer it borrows."""

from __future__ import annotations

import pytest

from raycat.config import ConfigError, validate_config
from raycat.data.prompts import render_ids, teach_messages
from raycat.data.synthetic import generate_arithmetic
from raycat.engines.base import Sampling, engine_kwargs, make_engine
from raycat.engines.oracle import OracleEngine

GREEDY = Sampling(temperature=0.0, top_p=1.0, max_tokens=256, seed=0)


def test_the_oracle_answers_rendered_teacher_prompts_with_verified_solutions(tiny_model_dir, tiny_tokenizer):
    engine = make_engine("oracle", str(tiny_model_dir))
    assert isinstance(engine, OracleEngine)
    rows = generate_arithmetic(8, 3, 4, seed=2, kinds=["sum3", "muladd"])
    prompts = [render_ids(tiny_tokenizer, teach_messages(r["question"], r["options"], r["category"])) for r in rows]
    out = engine.generate(prompts, GREEDY)
    for row, prompt, gen in zip(rows, prompts, out, strict=True):
        assert gen.text.endswith(f"[[{row['gold']}]]") and gen.finish_reason == "stop" and gen.error is None
        assert gen.prompt_tokens == len(prompt)
        # The text's tokens (no end-of-sequence token: the accounting counts text).
        assert gen.completion_tokens == len(tiny_tokenizer(gen.text, add_special_tokens=False)["input_ids"])
    # n samples per prompt, prompt-major, the prompt counted once (as the vLLM engine counts it).
    two = engine.generate(prompts[:1], Sampling(0.0, 1.0, 256, 0, n=2))
    assert [g.text for g in two] == [out[0].text] * 2 and [g.prompt_tokens for g in two] == [len(prompts[0]), 0]
    # A budget cut gives what a model cut there would.
    cut = engine.generate(prompts[:1], Sampling(0.0, 1.0, 5, 0))[0]
    assert cut.finish_reason == "length" and cut.completion_tokens == 5 and not cut.text.endswith("]]")
    exact = out[0].completion_tokens
    assert engine.generate(prompts[:1], Sampling(0.0, 1.0, exact - 1, 0))[0].finish_reason == "length"
    assert engine.generate(prompts[:1], Sampling(0.0, 1.0, exact, 0))[0].finish_reason == "stop"


def test_a_question_it_cannot_solve_is_a_failed_request_naming_why(tiny_model_dir, tiny_tokenizer):
    prompt = render_ids(tiny_tokenizer, teach_messages("Who wrote Hamlet?", ["Marlowe", "Shakespeare"], "lit"))
    gen = OracleEngine(str(tiny_model_dir)).generate([prompt], GREEDY)[0]
    assert gen.finish_reason == "error" and "synthetic.kinds" in gen.error and gen.text == ""
    with pytest.raises(ValueError, match="teacher solutions only"):
        OracleEngine(str(tiny_model_dir)).score([], "options", 1, 1)


def _tree(backend_at: str) -> dict:
    tree = {
        "data": {"source": "synthetic"},
        "score": {"student": {"path": "m"}},
        "teach": {"teachers": [{"model": {"path": "m"}, "engine": {"backend": "oracle"}}]},
    }
    if backend_at == "score":
        tree["score"]["engine"] = {"backend": "oracle"}
    if backend_at == "eval":
        tree["eval"] = {"engine": {"backend": "oracle"}}
    return tree


def test_oracle_is_a_teacher_backend_only():
    cfg = validate_config(_tree("teach"))
    assert engine_kwargs(cfg.teach.teachers[0].model, cfg.teach.teachers[0].engine) == {
        "revision": None,
        "trust_remote_code": False,
        "dtype": "auto",
        "device": "cpu",
    }
    for stage in ("score", "eval"):
        with pytest.raises(ConfigError, match=f"{stage}.engine.backend: 'oracle' writes teacher solutions only"):
            validate_config(_tree(stage))
    other = {**_tree("teach"), "data": {"source": "mmlu", "path": "cais/mmlu"}}
    with pytest.raises(ConfigError, match="'oracle' solves only data.source=synthetic questions; data.source is 'mm"):
        validate_config(other)


def test_the_oracle_is_labelled_and_never_shares_the_model_cache(tiny_model_dir, tmp_path):
    from raycat.teach.stage import make_plan

    tree = _tree("teach")
    tree["run_dir"] = str(tmp_path)
    tree["teach"]["teachers"][0]["model"]["path"] = str(tiny_model_dir)
    oracle = validate_config(tree)
    tree["teach"]["teachers"][0]["engine"]["backend"] = "vllm"
    model = validate_config(tree)
    a, b = make_plan(oracle, oracle.teach.teachers[0]), make_plan(model, model.teach.teachers[0])
    assert a.name.startswith("oracle (solver") and b.name == str(tiny_model_dir)
    assert a.cache_key != b.cache_key and a.backend == "oracle"
    # The solver's version is in its key: solutions written differently are taught again.
    import raycat.data.solve

    saved = raycat.data.solve.SOLVER_VERSION
    try:
        import raycat.teach.stage

        raycat.teach.stage.SOLVER_VERSION = "solve-v0"
        assert make_plan(oracle, oracle.teach.teachers[0]).cache_key != a.cache_key
    finally:
        raycat.teach.stage.SOLVER_VERSION = saved
