"""One engine for the base student and its LoRA phases (vLLM multi-LoRA): which models share an engine,
and what the eval actor asks and writes for a group (a recording engine; the real one:
tests/evaluate/test_multi_lora.py)."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from raycat.engines.base import Generation
from raycat.evaluate import stage
from raycat.evaluate.stage import EvalGroup, EvalPlan, engine_groups
from raycat.storage import rowkey, rundir


def _plan(name, model="base-dir", adapter=None, backend="vllm", kind="answer") -> EvalPlan:
    return EvalPlan(
        name=name,
        model_path=model,
        adapter=adapter,
        kind=kind,
        cache_key=name,
        max_tokens=16 if kind == "answer" else 64,
        max_prompt_tokens=400,
        seed=0,
        backend=backend,
        engine_kwargs={"revision": None, "trust_remote_code": False, "dtype": "float32"},
    )


def test_lora_phases_and_their_base_share_an_engine_full_and_merged_phases_do_not():
    base = _plan("base")
    a1, a2, a3 = (_plan(f"r{i}/phase1", adapter=f"a{i}") for i in (1, 2, 3))
    full = _plan("distill_all/phase1", model="full-dir")
    merged = _plan("sft_all/phase1", model="merged-dir")
    plans = [base, a1, full, a2, merged, a3]
    # The base student rides in the first engine serving its adapters (it takes no adapter slot).
    assert engine_groups(plans, 4) == [(base, a1, a2, a3), (full,), (merged,)]
    # At most max_loras adapters an engine.
    assert engine_groups(plans, 2) == [(base, a1, a2), (full,), (merged,), (a3,)]
    # No LoRA phase of that base: the base alone.
    assert engine_groups([base, full], 4) == [(base,), (full,)]
    # Another engine setting than its adapters': the base alone.
    other_base = dataclasses.replace(base, engine_kwargs={**base.engine_kwargs, "revision": "v2"})
    assert engine_groups([other_base, a1], 4) == [(other_base,), (a1,)]
    # 0: an engine per model, as before.
    assert engine_groups(plans, 0) == [(p,) for p in plans]
    # Another engine setting (e.g. a revision) is another engine; other backends serve one model each.
    other = dataclasses.replace(a2, engine_kwargs={**a2.engine_kwargs, "revision": "v2"})
    assert engine_groups([a1, other, a3], 4) == [(a1, a3), (other,)]
    hf = [_plan("base", backend="transformers"), _plan("x", adapter="a", backend="transformers")]
    assert engine_groups(hf, 4) == [(p,) for p in hf]


class Recorder:
    """Answers "[[B]]" to every prompt and records each call's (prompts, max_tokens, adapter)."""

    def __init__(self):
        self.calls = []

    def generate_each(self, calls):
        self.calls.extend((len(p), s.max_tokens, a) for p, s, a in calls)
        return [[Generation("[[B]]", len(x), 3, "stop") for x in p] for p, _, _ in calls]

    def close(self):
        pass


def test_a_group_asks_each_model_for_the_rows_it_has_not_answered_and_writes_a_part_each(
    tmp_path, tiny_model_dir, monkeypatch
):
    made = {}

    def make_engine(backend, path, **kwargs):
        made.update(kwargs, path=path)
        return Recorder()

    monkeypatch.setattr(stage, "make_engine", make_engine)
    plans = (
        _plan("ca/phase1", model=str(tiny_model_dir), adapter=str(tmp_path / "a0")),
        _plan("sft_all/phase1", model=str(tiny_model_dir), adapter=str(tmp_path / "a1")),
        _plan("ca/phase2", model=str(tiny_model_dir), adapter=str(tmp_path / "a2"), kind="cot"),
    )
    parts = tuple(str(tmp_path / "parts" / p.name.replace("/", "__")) for p in plans)
    rows = rowkey.add(
        pd.DataFrame(
            {
                "id": [f"q{i}" for i in range(5)],
                "question": [f"What is {i} + 1?" for i in range(5)],
                "options": [["1", "2", "3"]] * 5,
                "category": ["math"] * 5,
                "gold": ["B"] * 5,
                "band": ["easy"] * 5,
            }
        )
    )
    # sft_all/phase1 answered q0 and q1 in an interrupted run.
    rundir.write_part(rows.iloc[:2].assign(model="sft_all/phase1"), parts[1])
    actor = stage.EvalBatch(EvalGroup(plans, parts))
    assert made["lora_adapters"] == tuple(str(tmp_path / f"a{i}") for i in range(3)) and made["stream"] is True
    out = actor(rows)
    # One batch of requests per model, the adapters named, the answered rows left out.
    assert actor.engine.calls == [
        (5, 16, str(tmp_path / "a0")),
        (3, 16, str(tmp_path / "a1")),
        (5, 64, str(tmp_path / "a2")),
    ]
    assert out.groupby("model").size().to_dict() == {"ca/phase1": 5, "sft_all/phase1": 3, "ca/phase2": 5}
    assert list(out.loc[out["model"] == "sft_all/phase1", "id"]) == ["q2", "q3", "q4"]
    assert out["correct"].all() and set(out["kind"]) == {"answer", "cot"}
    # The writer puts each model's rows under its own parts dir.
    from raycat.engines.actor_pool import _write

    assert int(_write(out, dict(zip([p.name for p in plans], parts, strict=True)))["rows"].sum()) == 13
    for plan, d in zip(plans, parts, strict=True):
        got = rundir.read_parts(d, stage.PART_COLUMNS)
        assert set(got["model"]) == {plan.name}
    assert len(rundir.read_parts(parts[1], stage.PART_COLUMNS)) == 5


@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_a_model_alone_is_served_as_before(tmp_path, tiny_model_dir, monkeypatch, backend):
    made = {}

    class One:
        def generate(self, prompts, sampling):
            return [Generation("[[A]]", 1, 1, "stop") for _ in prompts]

        def close(self):
            pass

    def make_engine(backend, path, **kwargs):
        made.update(kwargs)
        return One()

    monkeypatch.setattr(stage, "make_engine", make_engine)
    plan = _plan("sft_all/phase1", model=str(tiny_model_dir), adapter=str(tmp_path / "a1"), backend=backend)
    actor = stage.EvalBatch(EvalGroup((plan,), (str(tmp_path / "p"),)))
    assert made["lora_adapter"] == str(tmp_path / "a1") and "lora_adapters" not in made
    assert made.get("stream", False) is (backend == "vllm")
    rows = rowkey.add(
        pd.DataFrame(
            {"id": ["q"], "question": ["?"], "options": [["x", "y"]], "category": [""], "gold": ["A"], "band": ["hard"]}
        )
    )
    assert actor(rows)["correct"].tolist() == [True]
