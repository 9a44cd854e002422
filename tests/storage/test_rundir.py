"""Run-directory I/O: the part files that are a stage's resume state."""

from __future__ import annotations

import pandas as pd

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
