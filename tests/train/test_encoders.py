"""Training rows tokenized on Encoder actors (raycat.train.encoders) on a real local Ray: results come
back in the order sent, from other processes, with the same examples, skipped rows and hashes as
encoding in place; the actors' CPUs are free again after; a template error names its row."""

from __future__ import annotations

import os
import shutil
import time

import pandas as pd
import pytest
from transformers import AutoTokenizer

from raycat.train import batches, encoders, examples, stage
from tests.train.test_examples import config, write_run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_two_cpus():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _cpus_back():
    import ray

    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < 2:
        assert time.time() < deadline, f"encoders' CPUs not given back: {ray.available_resources()}"
        time.sleep(0.2)


def _whose(batch):
    return os.getpid(), batch


def test_batches_come_back_in_order_from_actors(ray_two_cpus):
    with encoders.pool() as map_batches:
        assert map_batches is not map
        out = list(map_batches(_whose, range(25)))
    assert [b for _, b in out] == list(range(25))
    assert os.getpid() not in {pid for pid, _ in out}
    _cpus_back()


def _refuse():
    raise ModuleNotFoundError("No module named 'transformers_modules'")


class OnlyHere:
    """Loads only in this process, as a remote-code tokenizer's class does."""

    def __call__(self, batch):
        return os.getpid(), batch

    def __reduce__(self):
        return _refuse, ()


def test_an_encode_the_actors_cannot_load_runs_in_place(ray_two_cpus):
    with encoders.pool() as map_batches:
        out = list(map_batches(OnlyHere(), range(5)))
    assert out == [(os.getpid(), b) for b in range(5)]
    _cpus_back()


def test_no_free_cpu_encodes_in_place(ray_two_cpus):
    import ray

    @ray.remote(num_cpus=1)
    class Hold:
        def ready(self):
            return True

    held = [Hold.remote() for _ in range(2)]
    ray.get([h.ready.remote() for h in held])
    try:
        with encoders.pool() as map_batches:
            assert map_batches is map
    finally:
        for h in held:
            ray.kill(h)
    _cpus_back()


def test_actors_prepare_the_same_examples_as_in_place(tmp_path, monkeypatch, ray_two_cpus, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    here, there = tmp_path / "here", tmp_path / "there"
    write_run(here)
    shutil.copytree(here, there)
    monkeypatch.setattr(examples, "BATCH_ROWS", 7)
    expected, expected_skipped = stage.plan_phases(config(here, "complexity_aware", 2), tokenizer, str(tiny_model_dir))
    with encoders.pool() as map_batches:
        plans, skipped = stage.plan_phases(
            config(there, "complexity_aware", 2), tokenizer, str(tiny_model_dir), map_batches
        )
    assert [(p.stats, p.hash) for p in plans] == [(p.stats, p.hash) for p in expected]
    assert skipped == expected_skipped
    for name in ("train/complexity_aware/skipped.parquet", "train/complexity_aware/phase1/examples.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(there / name), pd.read_parquet(here / name))
    _cpus_back()


def test_a_template_error_on_an_actor_names_the_row(ray_two_cpus, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = pd.DataFrame(
        {"id": ["q1", "q2"], "question": ["a?", "b?"], "options": [["x", "y"]] * 2, "gold": ["A", "B"], "category": ""}
    )

    def encode(batch):
        # No stop ids: every example lacks a stop token.
        return batches.encode_rows(tokenizer, batch, "answer", set(), 64, "drop")

    with encoders.pool() as map_batches, pytest.raises(batches.TemplateError, match="row 'q1'.*stop token"):
        list(map_batches(encode, [rows]))
    _cpus_back()
