"""`edc results`: docs/results.md and README.md's headline from the trials, on made-up `dvc exp show`
output (tests/helpers.py: synthetic_trials), and the repository's own README against its page."""

from __future__ import annotations

import pytest

from edc.cli import main
from edc.report import HEADLINE_END, HEADLINE_START, commits, headline_block, ior_sentence, ior_verdict
from tests.helpers import ROOT, SYNTHETIC_COMMIT, md5_tree, patch_exp_show, synthetic_trials

README = f"# A project\n\nIntro.\n\n{HEADLINE_START}\nold numbers\n{HEADLINE_END}\n\nThe rest.\n"


def _results(tmp_path, monkeypatch, *extra: str) -> None:
    monkeypatch.chdir(tmp_path)
    main(["results", "--no-mlflow", *extra])  # the defaults: docs/results.md, docs/plots/results, README.md


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    patch_exp_show(monkeypatch, synthetic_trials())
    (tmp_path / "README.md").write_text(README)
    return tmp_path


def test_the_page_and_readme_are_byte_identical_on_a_rerun_and_share_one_headline(workspace, monkeypatch):
    _results(workspace, monkeypatch)
    page, readme = (workspace / "docs/results.md").read_text(), (workspace / "README.md").read_text()
    plots = md5_tree(workspace / "docs/plots/results")
    _results(workspace, monkeypatch)
    assert (workspace / "docs/results.md").read_text() == page and (workspace / "README.md").read_text() == readme
    assert md5_tree(workspace / "docs/plots/results") == plots and sorted(plots) == ["ior-ipc1.png", "ior-ipc10.png"]
    assert "![IOR vs random-soft at ipc 1](plots/results/ior-ipc1.png)" in page.splitlines()
    block = headline_block(page, "page")
    assert headline_block(readme, "README.md") == block
    # the rest of the README is the user's, untouched
    assert readme == README.replace("old numbers", block)
    assert "on commit `0000000`" in block and f"git checkout {SYNTHETIC_COMMIT[:7]}" in page
    # the command that made the page, as the user typed it, and how to rerun the trials
    assert "Made by `edc results --no-mlflow` from 19 experiments" in page
    assert ("edc exp preset edc --ipc 1 --trials 5 --queue -S evaluate.seeds=1 -S 'evaluate.variants=[hard,noaug]' "
            "-S reference.enabled=true") in page.splitlines()


def test_the_headline_holds_the_evidence_tables_numbers_and_a_method_with_fewer_trials_shows_its_count(
        workspace, monkeypatch):
    _results(workspace, monkeypatch)
    page = (workspace / "docs/results.md").read_text()
    rows = [ln for ln in headline_block(page, "page").splitlines() if ln.startswith("| ")]
    assert rows[0] == ("| method | trials | convnet | IOR convnet | resnet18 | IOR resnet18 | vit *(unseen)* | "
                       "IOR vit |")
    # hand-computed (tests/helpers.py synthetic_trials): edc on convnet 0.90, 0.92, 0.91, 0.93, 0.89: mean 91.00,
    # s = 0.0158, 2.776445 * s / sqrt(5) = 1.96; IOR +2.00 ± 1.24 (differences +2, +3, +1, +3, +1)
    assert rows[2].startswith("| edc | 5 × 1 seed | 91.00 ± 1.96 | +2.00 ± 1.24 | 86.20 ± 1.62 | -2.00 ± 1.24 |")
    assert rows[3].startswith("| random-soft | 5 × 1 seed | 89.00 ± 1.24 | 0 (baseline) |")
    assert rows[4].startswith("| rded | 3 × 1 seed | 85.00 ± 2.48 |")  # three trials, t(0.975, 2) = 4.302653
    lines = page.split(HEADLINE_END)[1].splitlines()
    assert "| edc | convnet | 5: 0,1,2,3,4 (1 seed) | 91.00 ± 1.96 | +2.00 ± 1.24 |" in " ".join(lines)
    assert any(ln.startswith("| rded | convnet | 3: 0,1,2 (1 seed) | 85.00 ± 2.48 |") for ln in lines)
    assert "Unseen students (an architecture none of the observers has): vit;" in page


def test_the_sentence_on_zero_follows_the_interval_as_printed():
    # (mean, half-width) as fractions; the tables print percent with two decimals
    assert ior_verdict((0.02, 0.012416)) == "above zero"  # +2.00 ± 1.24: 0.76 .. 3.24
    assert ior_verdict((0.0, 0.01756)) == "includes zero"  # +0.00 ± 1.76
    assert ior_verdict((-0.02, 0.012416)) == "below zero"
    assert ior_verdict((0.010004, 0.01)) == "includes zero"  # printed +1.00 ± 1.00: the interval touches zero
    assert ior_verdict((0.0101, 0.01)) == "above zero"  # printed +1.01 ± 1.00
    assert ior_verdict((0.02, None)) == "one trial" and ior_verdict(None) == "not measured"
    assert ior_sentence({"convnet": (0.02, 0.012416), "resnet18": (-0.02, 0.012416), "vit": (0.0, 0.01756)}, 1) == (
        "At ipc 1, edc's IOR interval is above zero on convnet (edc beats random-soft there); it includes zero on "
        "vit (no evidence that edc beats random-soft there); it is below zero on resnet18 (edc is worse than "
        "random-soft there).")
    assert ior_sentence({"convnet": (0.001, 0.02), "vit": (-0.001, 0.02)}, 1) == (
        "At ipc 1, edc's IOR interval includes zero on convnet, vit (no evidence that edc beats random-soft there).")


def test_the_page_names_every_commit_and_commit_keeps_one(workspace, monkeypatch):
    other = synthetic_trials("1" * 40)[1]
    other["experiments"] = [x for x in other["experiments"] if x["name"] == "edc-ipc10-t2"]
    for x in other["experiments"]:
        x["revs"][0]["data"]["timestamp"] = "2026-12-06T00:00:00"  # newer: this one wins its name
    patch_exp_show(monkeypatch, [*synthetic_trials(), other])
    _results(workspace, monkeypatch)
    page = (workspace / "docs/results.md").read_text()
    assert "ran on commits `0000000` (18 experiments), `1111111` (edc-ipc10-t2)." in page
    assert "# on each commit of the header (0000000, 1111111)" in page
    _results(workspace, monkeypatch, "--commit", "0000000")
    page = (workspace / "docs/results.md").read_text()
    # the name's experiment on that commit, though another commit's is newer
    assert "from 19 experiments" in page and "`edc results --commit 0000000 --no-mlflow`" in page
    assert "1111111" not in page and "| edc-ipc10-t2 | " in page


def test_commits_lists_few_names_and_counts_many():
    from edc.report import Experiment

    exps = [Experiment(f"edc-ipc1-t{t}", "r", "", {}, {}, baseline=("a" if t < 4 else "b") * 40) for t in range(6)]
    assert commits(exps[:4]) == "commit `aaaaaaa`"
    assert commits(exps) == "commits `aaaaaaa` (4 experiments), `bbbbbbb` (edc-ipc1-t4, edc-ipc1-t5)"


def test_a_readme_without_markers_is_one_line_and_nothing_is_written(workspace, monkeypatch, capsys):
    (workspace / "README.md").write_text("# A project\n")
    (workspace / "docs").mkdir()
    (workspace / "docs/results.md").write_text("the old page\n")
    with pytest.raises(SystemExit) as exit_:
        _results(workspace, monkeypatch)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("README.md: needs one <!-- results-headline:start --> line")
    assert (workspace / "docs/results.md").read_text() == "the old page\n"
    assert (workspace / "README.md").read_text() == "# A project\n"


def test_readme_and_results_page_in_the_repository_show_the_same_headline():
    """README.md's headline is docs/results.md's, as `edc results` wrote both: same numbers, same commit
    line. Editing one and not the other fails here; `edc results` rewrites both."""
    page = headline_block((ROOT / "docs/results.md").read_text(), "docs/results.md")
    readme = headline_block((ROOT / "README.md").read_text(), "README.md")
    assert readme == page
    assert "| edc |" in page and "| random-soft |" in page and " on commit" in page and "edc's IOR interval" in page


def test_the_rerun_commands_name_the_trials_measured_otherwise(tmp_path, monkeypatch):
    """Variants on some trials only (the results run measured HLR on trials 0-2 of five): the page's rerun
    lines say which trials ran with which measurements, so that a rerun can match the page."""
    from edc.report import _rerun_commands, read_experiments

    data = synthetic_trials()
    for e in data[1]["experiments"]:
        rev = e["revs"][0]
        if rev["name"] in ("edc-ipc1-t3", "edc-ipc1-t4"):
            rev["data"]["params"]["params.yaml"]["data"]["evaluate"]["variants"] = []
    patch_exp_show(monkeypatch, data)
    lines = _rerun_commands(read_experiments(tmp_path))
    assert ("edc exp preset edc --ipc 1 --trials 5 --queue -S evaluate.seeds=1 -S 'evaluate.variants=[hard,noaug]' "
            "-S reference.enabled=true") in lines
    assert ("#   edc-ipc1 trials 3,4 ran with -S evaluate.seeds=1 -S 'evaluate.variants=[]' "
            "-S reference.enabled=true") in lines
    assert not any(ln.startswith("#   random-soft") for ln in lines)  # measured alike: no extra line
