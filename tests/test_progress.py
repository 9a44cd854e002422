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


def test_the_eval_table_of_a_large_test_set_fits_a_job_log_line(monkeypatch):
    """Seen in job logs: the eval table cut at 160 columns, its right-hand columns ending in '…'."""
    import io

    from rich.console import Console

    from raycat import progress, tables

    out = io.StringIO()
    monkeypatch.setattr(tables, "console", Console(file=out, width=progress.JOB_LOG_WIDTH))
    cell = {"accuracy": 0.5123, "ci95": [0.4812, 0.5531], "n": 100_000, "unparsed": 12345}
    model = {"overall": cell, "per_band": {b: cell for b in ("easy", "medium", "hard")}, "band_average": 0.5}
    names = ["base (single-token, from score)", "base", "complexity_aware/phase2", "distill_all/phase1"]
    tables.eval_table({"test_rows": 100_000, "models": dict.fromkeys(names, model)}, None)
    text = out.getvalue()
    assert "…" not in text and text.count("n=100000") == 16 and "12345" in text
