"""Progress a cluster user can read in `ray job logs`: plain lines when there is no terminal."""

from raycat import progress


def test_without_a_terminal_rows_prints_plain_lines_with_rate_and_eta(monkeypatch, capsys):
    assert not progress.console.is_terminal  # pytest captures stderr: like a job log
    monkeypatch.setenv("RAYCAT_PROGRESS_INTERVAL_S", "0")
    with progress.rows("scoring", 10) as advance:
        advance(4)
        advance(6)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert lines[0] == "scoring: 0/10 rows"
    assert lines[1].startswith("scoring: 4/10 rows (40%),") and "rows/s" in lines[1] and "ETA" in lines[1]
    assert lines[2].startswith("scoring: 10/10 rows (100%),") and "ETA" not in lines[2]
    assert len(lines) == 3


def test_lines_are_spaced_by_the_interval_and_the_end_is_always_said(monkeypatch, capsys):
    monkeypatch.setenv("RAYCAT_PROGRESS_INTERVAL_S", "3600")
    with progress.rows("teaching", 100) as advance:
        for _ in range(5):
            advance(1)  # an interrupted stage: never reaches the total
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert lines == ["teaching: 0/100 rows", lines[1]] and lines[1].startswith("teaching: 5/100 rows (5%)")
