"""feed.Started: the first fetch runs while the caller does other work; items, order and errors are
those of the plain iterator. feed.layout / resume_refusal: a mid-epoch checkpoint resumes only under
the feed layout it was written with."""

from __future__ import annotations

import threading

import pytest

from raycat.storage import rundir
from raycat.train.feed import Started, layout, resume_refusal


def test_the_first_item_is_fetched_before_iteration_and_the_rest_follow_in_order():
    fetched = threading.Event()
    threads = []

    def items():
        threads.append(threading.current_thread())
        fetched.set()
        yield from range(5)
        threads.append(threading.current_thread())

    early = Started(items())
    # Nobody iterates yet: the thread has already fetched the first item.
    assert fetched.wait(5)
    assert list(early) == [0, 1, 2, 3, 4]
    # The first fetch in the background thread, the rest in the caller's.
    assert threads[0] is not threading.current_thread()
    assert threads[1] is threading.current_thread()


def test_an_empty_iterator_gives_nothing():
    assert list(Started(iter(()))) == []


def test_a_fetch_error_is_raised_where_the_items_are_iterated():
    def items():
        raise OSError("examples.parquet: no such file")
        yield  # a generator

    early = Started(items())
    with pytest.raises(OSError, match="no such file"):
        list(early)


def test_iterating_goes_on_where_the_consumer_left_off():
    import itertools

    batches = iter(Started(iter(range(10))))
    assert list(itertools.islice(batches, 3)) == [0, 1, 2]
    assert list(itertools.islice(batches, 3)) == [3, 4, 5]


def _examples(path, groups: list[int]) -> str:
    """A Parquet file of ``groups`` row groups (their row counts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, pa.schema([("x", pa.int64())])) as writer:
        for n in groups:
            writer.write_table(pa.table({"x": list(range(n))}))
    return str(path)


def test_the_layout_follows_the_read_tasks_and_the_worker_count(tmp_path):
    path = _examples(tmp_path / "examples.parquet", [3000, 3000, 3000, 3000])
    now = layout(rundir.parquet_spans(path), 2)
    assert now["read_tasks"] == 2
    assert layout(rundir.parquet_spans(path), 2) == now
    # raycat before c4a563a read one row group a task: another layout, as is another worker count.
    assert layout(rundir.parquet_spans(path, task_rows=1), 2)["read_spans"] != now["read_spans"]
    assert layout(rundir.parquet_spans(path), 4) != now


STATE = {"phase": "phase1", "epoch": 1, "batch": 5}
NOW = layout([(0, 2), (2, 4)], 2)


def test_a_checkpoint_at_an_epoch_boundary_resumes_under_any_layout():
    # Its next epoch starts fresh: any order is a whole pass.
    assert resume_refusal({**STATE, "batch": 0, "feed": layout([(0, 4)], 1)}, NOW, "phase1", "ck") is None
    assert resume_refusal({**STATE, "batch": 0}, NOW, "phase1", "ck") is None


def test_a_mid_epoch_checkpoint_resumes_under_its_own_layout_only():
    assert resume_refusal({**STATE, "feed": dict(NOW)}, NOW, "phase1", "ck") is None
    why = resume_refusal({**STATE, "feed": layout([(0, 1), (1, 2), (2, 3), (3, 4)], 2)}, NOW, "phase1", "/r/ck")
    assert why is not None
    assert "phase1" in why and "epoch 1, after 5 micro-batches" in why
    assert "read_tasks 4 then, 2 now" in why and "/r/ck" in why
    # Another worker count: the way back is the old count.
    other_world = resume_refusal({**STATE, "feed": layout([(0, 2), (2, 4)], 4)}, NOW, "phase1", "ck")
    assert "train.num_workers: 4" in other_world


def test_a_mid_epoch_checkpoint_without_a_recorded_layout_is_refused():
    why = resume_refusal(STATE, NOW, "phase2", "ck")
    assert why is not None and "did not record" in why and "phase2" in why


def test_a_refused_resume_reaches_the_user_as_the_refusal_not_as_rerun_to_resume(monkeypatch):
    from types import SimpleNamespace

    from ray.train.v2.api.exceptions import WorkerGroupError

    from raycat.errors import RaycatError
    from raycat.train import stage
    from raycat.train.feed import FeedMismatch

    why = resume_refusal(STATE, NOW, "phase1", "/r/ck")

    def refused(*args, **kwargs):
        raise WorkerGroupError("rank 0 failed", {0: FeedMismatch(why), 1: FeedMismatch(why)})

    monkeypatch.setattr(stage, "fit_phases", refused)
    cfg = SimpleNamespace(train=SimpleNamespace(max_failures=2))
    fit = [(SimpleNamespace(phase=SimpleNamespace(name="phase1")), "dir", {})]
    with pytest.raises(RaycatError) as caught:
        stage._fit_and_check(cfg, fit, 0)
    assert str(caught.value) == why and "rerun the command to resume" not in str(caught.value)

    def crashed(*args, **kwargs):
        raise WorkerGroupError("rank 0 failed", {0: MemoryError("out of memory")})

    monkeypatch.setattr(stage, "fit_phases", crashed)
    with pytest.raises(RaycatError, match="rerun the command to resume"):
        stage._fit_and_check(cfg, fit, 0)
