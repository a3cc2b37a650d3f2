"""Long stages talk in logs: a progress line at most every EDC_PROGRESS_SECONDS without a terminal."""

from __future__ import annotations

import io

from edc.runtime import LineProgress, progress


def test_a_line_per_interval_with_done_total_and_time_left():
    out = io.StringIO()
    items = list(LineProgress(range(4), desc="synthesize batch 1/1", unit="it", interval=0.0, file=out))
    assert items == [0, 1, 2, 3]
    lines = out.getvalue().splitlines()
    assert [ln.split(",")[0] for ln in lines] == [f"synthesize batch 1/1: {i}/4 it" for i in range(1, 5)]
    assert "s left" in lines[0] and "0 s left" in lines[-1]


def test_quiet_when_the_loop_is_shorter_than_the_interval():
    out = io.StringIO()
    assert sum(LineProgress(range(100), desc="x", interval=30.0, file=out)) == sum(range(100))
    assert out.getvalue() == ""


def test_without_a_terminal_progress_is_line_based(monkeypatch, capsys):
    monkeypatch.setenv("EDC_PROGRESS_SECONDS", "0")
    bar = progress(range(3), desc="relabel", unit="epoch")  # pytest's stderr is not a terminal
    assert isinstance(bar, LineProgress)
    list(bar)
    assert capsys.readouterr().err.splitlines()[-1].startswith("relabel: 3/3 epoch")
