"""Long stages talk in logs: a progress line at most every EDC_PROGRESS_SECONDS without a terminal."""

from __future__ import annotations

import io

from edc.progress import LineProgress, progress


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
    from edc import progress as progress_module

    # No start hook waiting (an earlier test in this process may have imported edc.tracking, which
    # registers one): with one, the bar comes wrapped in the hook's announcer.
    monkeypatch.setattr(progress_module, "_start_hooks", [])
    monkeypatch.setenv("EDC_PROGRESS_SECONDS", "0")
    bar = progress(range(3), desc="relabel", unit="epoch")  # pytest's stderr is not a terminal
    assert isinstance(bar, LineProgress)
    list(bar)
    assert capsys.readouterr().err.splitlines()[-1].startswith("relabel: 3/3 epoch")


def test_a_start_hook_runs_once_at_the_first_item_of_the_next_loop(monkeypatch):
    from edc import progress as progress_module

    monkeypatch.setattr(progress_module, "_start_hooks", [])
    calls = []
    progress_module.on_work_start(lambda: calls.append("started"))
    loop = iter(progress(range(3), desc="x"))
    assert calls == []  # reading inputs before the loop is not work yet
    assert next(loop) == 0 and calls == ["started"]
    assert list(loop) == [1, 2] and list(progress(range(2), desc="y")) == [0, 1]
    assert calls == ["started"]


def test_tracking_learns_from_the_first_progress_item_that_work_began():
    """The stage's MLflow thread waits for it (edc.tracking.work_started); progress imports no tracking."""
    import sys

    from tests.helpers import run

    code = ("from edc import tracking\nfrom edc.progress import progress\n"
            "loop = iter(progress(range(2)))\nassert not tracking.work_started.is_set()\n"
            "next(loop)\nassert tracking.work_started.is_set()\nprint('ok')\n")
    r = run([sys.executable, "-c", code], timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
