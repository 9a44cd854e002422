"""Run-directory I/O: the part files that are a stage's resume state."""

from __future__ import annotations

import pandas as pd
import pytest

from raycat.storage import rundir


def test_parts_are_named_after_their_ids_so_a_retried_block_replaces_its_part(tmp_path):
    parts = str(tmp_path / "parts")
    a = pd.DataFrame({"id": ["q2", "q1"], "v": [1, 2]})
    assert rundir.write_part(a, parts) == 2
    # The same block again (a retried task): same part
    assert rundir.write_part(a.iloc[::-1], parts) == 2
    assert rundir.write_part(pd.DataFrame({"id": ["q3"], "v": [3]}), parts) == 1
    assert rundir.write_part(pd.DataFrame({"id": [], "v": []}), parts) == 0  # nothing written for nothing
    files = rundir.list_files(parts, ".parquet")
    assert len(files) == 2 and all(f.rsplit("/", 1)[1].startswith("part-") for f in files)
    assert sorted(rundir.read_parts(parts, ["id", "v"])["id"]) == ["q1", "q2", "q3"]


def test_part_keys_select_rows_by_status_or_by_any_other_status(tmp_path):
    from raycat.storage import rowkey

    parts = str(tmp_path / "parts")
    rows = pd.DataFrame({"id": ["a", "b", "c"], "row_hash": ["h1", "h2", "h3"]})
    rundir.write_part(rows.assign(status=["verified", "failed", "wrong"]), parts)
    asked = pd.concat([rows, pd.DataFrame({"id": ["a", "d"], "row_hash": ["other", "h4"]})], ignore_index=True)

    def done(status=None) -> list[str]:
        keys = rundir.part_keys(parts, status)
        return list(asked["id"][keys.contains(rowkey.key64(asked))])

    assert done() == ["a", "b", "c"] and len(rundir.part_keys(parts)) == 3
    assert done("failed") == ["b"]
    # A teacher's resume rule: answered (anything but a failed request) is done.
    assert done("!failed") == ["a", "c"]
    assert not rundir.part_keys(str(tmp_path / "none")).contains(rowkey.key64(asked)).any()


def test_read_spans_cover_every_row_group_once_in_order():
    assert rundir.read_spans([8, 8, 8, 3], 16) == [(0, 2), (2, 4)]
    assert rundir.read_spans([20, 1], 16) == [(0, 1), (1, 2)]
    assert rundir.read_spans([], 16) == []
    assert rundir.group_rows(16) == rundir.GROUP_ROWS and rundir.group_rows(10**5) == 10**5


@pytest.mark.integration
def test_a_parquet_dataset_is_read_in_few_tasks_and_cut_into_blocks_while_engines_hold_the_cpus(tmp_path):
    """A footer is parsed per read task, not per row group: ~READ_ROWS rows a task, cut into blocks
    inside the task (fused: with 0.2 CPU left, a cut asking a whole CPU would wait forever)."""
    import ray

    n = 20_000
    path = str(tmp_path / "rows.parquet")
    rundir.write_parquet(path, pd.DataFrame({"id": [f"q{i}" for i in range(n)]}), row_group_size=rundir.group_rows(16))
    assert rundir.row_group_rows(path) == [8192, 8192, 3616]
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        engine = ray.remote(num_cpus=0.8)(Engine).remote()
        ray.get(engine.ready.remote())
        dataset = rundir.cut_blocks(rundir.parquet_dataset(path), 16, num_cpus=0.1)
        blocks = [b["id"].tolist() for b in dataset.iter_batches(batch_size=None, batch_format="pandas")]
        stats = dataset.stats()
    finally:
        ray.shutdown()
    assert max(map(len, blocks)) == 16 and sorted(i for b in blocks for i in b) == sorted(f"q{i}" for i in range(n))
    assert "MapBatches(_read_groups)->StreamingRepartition" in stats
    assert "3 tasks executed" in stats.split("MapBatches(_read_groups)")[1].split("\n")[0]


class Engine:
    def ready(self) -> bool:
        return True
