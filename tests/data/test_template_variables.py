"""Chat-template variables (config.chat_template_kwargs): a Llama-3.1-style template writes today's
date into every prompt unless date_string is given; a rerun on another day must find its caches and
finished phases."""

from __future__ import annotations

import datetime as dt
import shutil

import pandas as pd
import pytest

from raycat.config import validate_config
from raycat.data.prompts import render_ids, template_hash, train_messages
from raycat.testing.tiny_models import LLAMA3_DATED as DATED


@pytest.fixture
def dated_model(tmp_path, tiny_llama3_dir):
    from transformers import AutoTokenizer

    model = tmp_path / "dated"
    shutil.copytree(tiny_llama3_dir, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = DATED
    tokenizer.save_pretrained(model)
    return model, AutoTokenizer.from_pretrained(model)


@pytest.fixture
def clock(monkeypatch):
    """Set the day the chat template's strftime_now sees."""
    import transformers.utils.chat_template_utils as chat_template_utils

    def set_day(day: dt.datetime) -> None:
        class Frozen(dt.datetime):
            @classmethod
            def now(cls, tz=None):
                return day

        monkeypatch.setattr(chat_template_utils, "datetime", Frozen)

    return set_day


def _config(model, run_dir, **extra):
    tree = {
        "run_dir": str(run_dir),
        "data": {"source": "synthetic"},
        "score": {"student": {"path": str(model)}},
        "train": {"recipe": "sft_all", "method": "lora"},
        **extra,
    }
    return validate_config(tree)


def test_the_clock_moves_prompts_only_without_a_date_string(dated_model, clock):
    _, tokenizer = dated_model
    messages = train_messages("What is 2 + 2?", ["3", "4"], "math", "answer")
    clock(dt.datetime(2026, 12, 4))
    today = render_ids(tokenizer, messages)
    unfixed_today = render_ids(tokenizer, messages, {})
    clock(dt.datetime(2026, 12, 5))
    assert render_ids(tokenizer, messages) == today  # the configured date_string
    assert render_ids(tokenizer, messages, {}) != unfixed_today  # the template's own strftime_now


def test_a_rerun_the_next_day_finds_its_score_cache_and_its_trained_phases(dated_model, clock, tmp_path):
    from raycat.score.core import cache_key
    from raycat.score.stage import make_plan
    from raycat.storage import rowkey, rundir
    from raycat.train.stage import plan_phases

    model, tokenizer = dated_model
    split = tmp_path / "run" / "split"
    split.mkdir(parents=True)
    for band, start in (("easy", 0), ("medium", 3), ("hard", 6)):
        ids = [f"q{i}" for i in range(start, start + 3)]
        rows = pd.DataFrame({"id": ids, "question": [f"{i}?" for i in ids], "options": [["a", "b"]] * 3, "gold": "A"})
        rowkey.add(rows.assign(category="c")).to_parquet(split / f"{band}.parquet")

    def state(cfg):
        score = make_plan(cfg, tokenizer, 2, [])
        phases, _ = plan_phases(cfg, tokenizer, str(model))
        key = cache_key(cfg, str(model), score.template_hash)
        first_ids = rundir.read_parquet(phases[0].examples)["input_ids"].map(list).tolist()
        return key, [phase.hash for phase in phases], first_ids

    cfg = _config(model, tmp_path / "run")
    clock(dt.datetime(2026, 12, 4))
    first = state(cfg)
    clock(dt.datetime(2026, 12, 5))
    assert state(cfg) == first
    # Other template variables are part of every key: a different prompt is a different cache.
    thinking = _config(model, tmp_path / "run", chat_template_kwargs={"date_string": "26 Jul 2024", "x": False})
    changed = state(thinking)
    assert changed[0] != first[0] and changed[1] != first[1]
    assert template_hash(tokenizer, "letters", None, {"date_string": "1 Jan 2025"}) != template_hash(
        tokenizer, "letters", None
    )


@pytest.mark.integration
def test_the_test_clock_moves_the_date_a_chat_template_renders_in_a_subprocess(tiny_dated_dir):
    """The clock tests/e2e/test_run.py moves to rerun a job the next day reaches the template."""
    import subprocess
    import sys

    from tests.helpers import days_ahead

    code = (
        "import sys; from transformers import AutoTokenizer; "
        "t = AutoTokenizer.from_pretrained(sys.argv[1]); "
        "print(t.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False))"
    )
    days = {dt.date.today() + dt.timedelta(days=1)}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_dated_dir)], env=days_ahead(1), capture_output=True, text=True, check=True
    ).stdout
    days.add(dt.date.today() + dt.timedelta(days=1))  # midnight in between
    assert any(f"Today Date: {d.strftime('%d %b %Y')}" in out for d in days), out
