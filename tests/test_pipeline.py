"""The pipeline end to end: as scripts, and through DVC in a throwaway repository."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sqlite3
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from edc.imageset import read_imageset
from edc.io import md5_file, read_json
from edc.stats import load_stats
from tests.helpers import (
    APPS,
    PIPELINE,
    REFERENCE,
    lock_outs,
    make_dvc_repo,
    md5_tree,
    ran,
    run,
    run_stages,
    sh,
    sh_fails,
    tiny_params,
    write_yaml,
)

pytestmark = pytest.mark.pipeline


def test_stages_write_their_contracts_and_are_byte_deterministic(tmp_path):
    tiny = tiny_params()
    tiny["dataset"]["val_size"] = 200
    params = write_yaml(tmp_path / "params.yaml", tiny)
    run_stages(tmp_path / "a", params)
    run_stages(tmp_path / "b", params)
    a = tmp_path / "a"
    assert md5_tree(a) == md5_tree(tmp_path / "b")
    assert sorted(md5_tree(a)) == [
        "condensed/images/images.npy", "condensed/images/labels.npy", "condensed/images/meta.json",
        "condensed/init/images.npy", "condensed/init/labels.npy", "condensed/init/meta.json",
        "condensed/shards/images-000000.tar", "condensed/shards/labels-000000.tar",
        "condensed/shards/meta.json",
        "data/prepared/facts.json", "data/prepared/test_images.npy", "data/prepared/test_labels.npy",
        "data/prepared/train_images.npy", "data/prepared/train_labels.npy", "data/prepared/val_images.npy",
        "data/prepared/val_labels.npy",
        "models/observers/tiny.json", "models/observers/tiny.safetensors",
        "reports/init_grid.png", "reports/metrics.json", "reports/observers.json",
        "reports/plots/accuracy/student-seed0-ema.csv", "reports/plots/accuracy/student-seed0-raw.csv",
        "reports/plots/evaluate/student-seed0.csv", "reports/plots/observers/tiny.csv",
        "reports/plots/synth_loss.csv", "reports/relabel.json", "reports/stats.json", "reports/synth.json",
        "reports/synth_grid.png", "stats/tiny.safetensors",
    ]
    spec = read_json(a / "models/observers/tiny.json")
    assert spec["arch"] == "convnet" and spec["dataset"]["name"] == "mnist5k" and spec["training"]["epochs"] == 1
    assert read_json(a / "reports/observers.json")["tiny"]["test_acc"] == spec["test_acc"] > 0.5
    stats, meta = load_stats(a / "stats/tiny.safetensors")
    assert len(stats) == 2 and meta["observer_md5"] == md5_file(a / "models/observers/tiny.safetensors")
    assert stats["features.1"].class_mean.shape == (10, 8)
    # 380 train images of class 0 once val took 20; statistics of 2 crops of each (stats.draws)
    assert float(stats["features.1"].class_count[0]) == 380 * 2 * 28 * 28
    assert meta["targets"] == {"augment": True, "draws": 2, "aug": {"scale_min": 0.5, "flip": False}}
    init_images, init_labels, init_meta = read_imageset(a / "condensed/init")
    assert init_images.shape == (20, 1, 28, 28) and init_labels.tolist() == sorted(list(range(10)) * 2)
    assert len(init_meta["index"]) == 20 and len(init_meta["index"][0]["sources"]) == 4  # factor 2: 2 x 2 tiles
    images, labels, meta = read_imageset(a / "condensed/images")
    assert images.shape == init_images.shape and torch.equal(labels, init_labels)
    assert not torch.equal(images, init_images) and meta["init"] == "rded"
    assert len((a / "reports/plots/synth_loss.csv").read_text().splitlines()) == 1 + 4
    metrics = read_json(a / "reports/metrics.json")["student"]
    assert set(metrics) == {"acc_mean", "acc_std", "raw_acc_mean", "seeds", "val_acc_mean", "val_acc_std",
                            "raw_val_acc_mean"} and 0 <= metrics["acc_mean"] <= 1 and 0 <= metrics["val_acc_mean"] <= 1
    assert "val_acc" in (a / "reports/plots/evaluate/student-seed0.csv").read_text().splitlines()[0]
    ema = (a / "reports/plots/accuracy/student-seed0-ema.csv").read_text().splitlines()
    raw = (a / "reports/plots/accuracy/student-seed0-raw.csv").read_text().splitlines()
    # The curves show the validation split; the test split is scored once, at the end (metrics.json).
    assert ema[0] == raw[0] == "epoch,val_acc" and len(ema) == len(raw) == 1 + 2  # eval_every 1, 2 epochs
    assert float(raw[-1].split(",")[1]) == metrics["raw_val_acc_mean"]
    assert not any("test" in f.read_text() for f in (a / "reports/plots").rglob("*.csv"))
    stored = read_json(a / "reports/relabel.json")["bytes"]
    shards = a / "condensed/shards"
    assert stored["total"] == sum(f.stat().st_size for f in shards.iterdir())


def test_post_evaluate_names_a_bad_shard(tiny_workspace, tmp_path):
    shutil.copytree(tiny_workspace, tmp_path, dirs_exist_ok=True)
    params = tmp_path / "params.yaml"
    shard = tmp_path / "condensed/shards/labels-000000.tar"
    shard.unlink()
    r = run([sys.executable, "stages/post_evaluate.py", "--params", str(params), "--data",
             str(tmp_path / "data/prepared"), "--shards", str(tmp_path / "condensed/shards"), "--metrics",
             str(tmp_path / "m.json"), "--curves", str(tmp_path / "curves")], timeout=300)
    said = f"{shard}: missing (one of the 1 label shards meta.json lists)"
    assert r.returncode == 2 and r.stderr.strip() == said, r.stderr
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "curves").exists()


@pytest.mark.parametrize("codec", ["int8", "hard"])
def test_relabel_and_post_evaluate_with_a_compressed_codec(tiny_workspace, tmp_path, capsys, codec):
    """relabel.codec int8 with one stored epoch of three (label_views 2 at ipc 2: one epoch's views), and
    hard: the stages store what params.yaml asks, report it, and post_evaluate trains on it (classes for
    hard labels, without teachers)."""
    p = tiny_params()
    p["relabel"].update(codec=codec, epochs=3, label_epochs=0, label_views=2 if codec == "int8" else 0)
    # No stage before relabel reads relabel's keys (STAGE_PARAMS): the session's tiny workspace holds
    # their outputs for these params too, and only relabel and post_evaluate run again.
    shutil.copytree(tiny_workspace, tmp_path, dirs_exist_ok=True)
    run_stages(tmp_path, write_yaml(tmp_path / "params.yaml", p), ("relabel", "post_evaluate"))
    report = read_json(tmp_path / "reports/relabel.json")
    meta = read_json(tmp_path / "condensed/shards/meta.json")
    assert meta["codec"] == report["codec"] == codec and meta["epochs"] == report["epochs"] == 3
    assert report["stored_epochs"] == (1 if codec == "int8" else 3)
    assert report["bytes"] == meta["bytes"]
    assert report["bytes"]["labels"] == (20 * 1 * (10 + 4) if codec == "int8" else 0)
    # the card says how the images were made, not synthesis's loss diagnostics (reports/synth.json)
    images = read_json(tmp_path / "condensed/images/meta.json")
    assert "matching" in images and meta["params"]["synthesis"] == {k: v for k, v in images.items() if k != "matching"}
    assert ("teacher_agreement" in report) == (codec != "hard")
    import mlflow

    from edc.tracking import mlflow_experiment, tracking_uri

    client = mlflow.MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(mlflow_experiment())
    run = client.search_runs([exp.experiment_id], "tags.`edc.stage` = 'relabel'",
                             order_by=["attributes.start_time DESC"])[0]
    for kind in ("images", "labels", "plan", "container", "total"):
        assert run.data.metrics[f"bytes.{kind}"] == report["bytes"][kind]
        assert run.data.metrics[f"bytes_per_image_epoch.{kind}"] == report["bytes"]["per_image_epoch"][kind]
    out = capsys.readouterr().out
    assert f"({'hard' if codec == 'hard' else 'soft'} labels, 3 epochs)" in out, out
    assert 0 <= read_json(tmp_path / "reports/metrics.json")["student"]["acc_mean"] <= 1


def test_a_failing_stage_keeps_the_earlier_output(tmp_path, default_params):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "facts.json").write_text("earlier")
    default_params["dataset"].update(name="cifar10", root=str(tmp_path / "missing"))
    params = write_yaml(tmp_path / "params.yaml", default_params)
    r = run([sys.executable, "stages/prepare.py", "--params", str(params), "--out", str(out)], timeout=300)
    assert r.returncode == 2 and r.stderr.strip().endswith("missing does not exist"), r.stderr
    assert (out / "facts.json").read_text() == "earlier" and len(list(tmp_path.iterdir())) == 2


# --- through DVC ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def history(tmp_path_factory) -> SimpleNamespace:
    """One throwaway DVC repository taken through what a user does, once for the focused tests below
    (they share an xdist group, so one worker builds it): ``dvc repro``, a no-op repro, a forced one
    without the run-cache, a commit and a fresh clone, then three ``dvc exp run`` that each change one
    param. Records what each step ran and wrote, and a copy of the MLflow store before the queued sweep."""
    repo, env = make_dvc_repo(tmp_path_factory.mktemp("history"))
    h = SimpleNamespace(repo=repo, env=env, ran={}, read={})
    h.ran["repro"] = ran(sh(["dvc", "repro"], repo, env))
    h.lock = lock_outs(repo)
    h.ran["no-op"] = ran(sh(["dvc", "repro"], repo, env))
    sh(["dvc", "repro", "--force", "--no-run-cache"], repo, env)
    h.forced_lock = lock_outs(repo)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "lock"], repo, env)
    h.accuracy = read_json(repo / "reports/metrics.json")["student"]["acc_mean"]
    clone = repo.parent / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], repo.parent, env)
    h.clone_metrics = sh(["dvc", "metrics", "show", "--json"], clone, env)
    h.clone_plots = sh(["dvc", "plots", "show", "--json"], clone, env)
    for name, key, value, what in (("two-epochs", "observers.epochs", "2", "models/observers/tiny.json"),
                                   ("alpha-quarter", "alpha", "0.25", "condensed/images/meta.json"),
                                   ("zeta-one-half", "zeta", "1.5", "reports/metrics.json")):
        h.ran[name] = ran(sh(["dvc", "exp", "run", "-S", f"{key}={value}", "-n", name], repo, env))
        h.read[name] = read_json(repo / what)
    h.exp_show = {r["Experiment"]: r for r in csv.DictReader(io.StringIO(
        sh(["dvc", "exp", "show", "--no-pager", "--csv"], repo, env)))}
    h.relabel_set_id = read_json(repo / "condensed/shards/meta.json")["set_id"]
    h.db = repo.parent / "mlflow-before-queue.db"
    shutil.copy(repo / "mlflow.db", h.db)
    return h


def _db_rows(h, sql: str, args=()) -> list:
    return sqlite3.connect(h.db).execute(sql, args).fetchall()


def _stage_runs(h) -> list[tuple[str, str, str]]:
    return _db_rows(h, "select r.run_uuid, r.status, t.value from runs r join tags t on t.run_uuid = r.run_uuid "
                       "and t.key = 'edc.stage'")


def _run_of(h, stage_name: str, exp: str) -> str:
    (run,) = [r for (r,) in _db_rows(
        h, "select t.run_uuid from tags t join tags s on s.run_uuid = t.run_uuid and s.key = 'edc.stage' "
           "and s.value = ? where t.key = 'dvc.exp_name' and t.value = ?", (stage_name, exp))]
    return run


@pytest.mark.slow
@pytest.mark.xdist_group("dvc-history")
def test_repro_runs_every_stage_once_then_nothing(history):
    assert history.ran["repro"] == {*PIPELINE, *APPS, REFERENCE}
    assert {k for k in history.lock if not k.split(":")[1].startswith("reports")} == {
        "prepare:data/prepared", "train_observers:models/observers", "collect_stats:stats", "init:condensed/init",
        "synthesize:condensed/images", "relabel:condensed/shards"}
    assert history.ran["no-op"] == set()


@pytest.mark.slow
@pytest.mark.xdist_group("dvc-history")
def test_forced_repro_without_run_cache_gives_the_same_bytes(history):
    assert history.forced_lock == history.lock


@pytest.mark.slow
@pytest.mark.xdist_group("dvc-history")
def test_a_fresh_clone_shows_the_committed_metrics_and_plots(history):
    """Metrics and plots are in git, so DVC shows them in a clone with no cache or remote."""
    assert "failed" not in history.clone_metrics.lower(), history.clone_metrics
    shown = json.loads(history.clone_metrics)[""]["data"]["reports/metrics.json"]["data"]
    assert shown["student"]["acc_mean"] == history.accuracy
    plots = json.loads(history.clone_plots)
    assert not plots.get("errors"), history.clone_plots


@pytest.mark.slow
@pytest.mark.xdist_group("dvc-history")
def test_a_param_reruns_only_the_stages_that_read_it(history):
    # an observers param: everything but prepare
    assert history.ran["two-epochs"] == set(PIPELINE + APPS) - {"prepare"}
    assert history.read["two-epochs"]["training"]["epochs"] == 2
    # alpha: synthesize and what follows it, nothing upstream
    assert history.ran["alpha-quarter"] == {"synthesize", "relabel", "post_evaluate", *APPS}
    assert history.read["alpha-quarter"]["alpha"] == 0.25
    # zeta: post_evaluate, and continual and reference, which train students with the same recipe
    assert history.ran["zeta-one-half"] == {"post_evaluate", "continual", REFERENCE}


@pytest.mark.slow
@pytest.mark.xdist_group("dvc-history")
def test_exp_show_lists_each_experiments_params_and_accuracy(history):
    # (each `dvc exp run` starts from the workspace the previous one left, so zeta-one-half keeps alpha 0.25)
    for name, alpha, zeta in (("alpha-quarter", "0.25", "2.0"), ("zeta-one-half", "0.25", "1.5")):
        row = history.exp_show[name]
        assert (row["alpha"], row["zeta"]) == (alpha, zeta)
        assert 0 <= float(row["student.acc_mean"]) <= 1, row
    # the last experiment's row is the metrics file it left in the workspace
    assert float(history.exp_show["zeta-one-half"]["student.acc_mean"]) == pytest.approx(
        history.read["zeta-one-half"]["student"]["acc_mean"])


@pytest.mark.slow
@pytest.mark.xdist_group("dvc-history")
def test_mlflow_holds_one_finished_run_per_stage_execution(history):
    """The default store under the repository root: one run per stage that ran (a run-cache restore
    logs nothing), tagged with its experiment, under one parent run per pipeline run."""
    runs = _stage_runs(history)
    expected = list(PIPELINE) * 2 + [s for s in PIPELINE if s != "prepare"] + ["synthesize", "relabel", "post_evaluate",
                                                                          "post_evaluate"]
    assert sorted(s for _, _, s in runs) == sorted(expected)
    assert {status for _, status, _ in runs} == {"FINISHED"}
    exp_tags = sorted(v for (v,) in _db_rows(
        history, "select t.value from tags t join tags s on s.run_uuid = t.run_uuid and s.key = 'edc.stage' "
                 "where t.key = 'dvc.exp_name'"))
    assert exp_tags == ["alpha-quarter"] * 3 + ["two-epochs"] * 6 + ["zeta-one-half"]
    # two `dvc repro` that ran stages (the no-op one ran nothing) and three `dvc exp run`
    parent_of = dict(_db_rows(history, "select run_uuid, value from tags where key = 'mlflow.parentRunId'"))
    pipelines = dict(_db_rows(history, "select r.run_uuid, r.status from runs r join tags t on t.run_uuid = "
                                       "r.run_uuid and t.key = 'edc.pipeline'"))
    assert len(pipelines) == 5 and set(pipelines.values()) == {"FINISHED"}
    assert {parent_of.get(run_id) in pipelines for run_id, _, _ in runs} == {True}
    for name, n_stages in (("alpha-quarter", 3), ("two-epochs", 6), ("zeta-one-half", 1)):
        (parent,) = [r for (r,) in _db_rows(
            history, "select t.run_uuid from tags t join tags p on p.run_uuid = t.run_uuid and p.key = "
                     "'edc.pipeline' where t.key = 'dvc.exp_name' and t.value = ?", (name,))]
        assert list(parent_of.values()).count(parent) == n_stages
    epochs = _db_rows(history, "select value from params where key = 'observers.epochs'")
    assert sorted(json.loads(v) for (v,) in epochs) == [1, 1, 2]


@pytest.mark.slow
@pytest.mark.xdist_group("dvc-history")
def test_mlflow_nests_students_and_records_the_set(history):
    """post_evaluate's student/seed runs nest under its stage run with a point per epoch; the set's
    card is an artifact of the relabel run, and the set an input of post_evaluate."""
    post = _run_of(history, "post_evaluate", "zeta-one-half")
    parent_of = dict(_db_rows(history, "select run_uuid, value from tags where key = 'mlflow.parentRunId'"))
    seed_runs = [r for r, parent in parent_of.items() if parent == post]
    assert len(seed_runs) == 1
    assert _db_rows(history, "select name from runs where run_uuid = ?", seed_runs) == [("student seed 0",)]
    assert _db_rows(history, "select count(*) from metrics where run_uuid = ? and key = 'train_loss'",
                    seed_runs) == [(2,)]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{history.db}")
    relabel = _run_of(history, "relabel", "alpha-quarter")
    assert "condensed_set/meta.json" in [a.path for a in client.list_artifacts(relabel, "condensed_set")]
    inputs = client.get_run(post).inputs.dataset_inputs
    assert [i.dataset.digest for i in inputs] == [history.relabel_set_id[:36]]


@pytest.mark.slow
@pytest.mark.xdist_group("dvc-history")
def test_a_queued_sweep_loses_no_run_and_the_report_shows_it(history):
    """Two sweep points queued and run at once (`dvc queue start -j 2`): no MLflow run or metric is
    lost, and `edc report` shows the numbers `dvc exp show` and MLflow hold for them."""
    repo, env = history.repo, history.env
    edc = [sys.executable, "-m", "edc.cli"]
    # a sweep point is the edc preset, which pins the budget: shrunk back to the tiny workspace's by -S
    sh([*edc, "exp", "sweep", "zeta", "--values", "1.5", "2.5", "--queue", "-S", "synth.iterations=4",
        "-S", "relabel.batch_size=8", "-S", "relabel.epochs=2", "-S", "relabel.min_steps=0",
        "-S", "evaluate.seeds=1", "-S", "evaluate.eval_every=1"], repo, env)
    sh(["dvc", "queue", "start", "-j", "2"], repo, env)
    deadline = time.monotonic() + 600
    while True:
        status = sh(["dvc", "queue", "status"], repo, env)
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, status
        time.sleep(3)
    assert status.count("Success") == 2, status
    shown = {}
    for baseline in json.loads(sh(["dvc", "exp", "show", "--json"], repo, env)):
        for e in baseline.get("experiments") or []:
            r = e["revs"][0]
            shown[r["name"]] = r["data"]["metrics"]["reports/metrics.json"]["data"]["student"]
    db = sqlite3.connect(repo / "mlflow.db")
    sh([*edc, "report"], repo, env)
    report = (repo / "reports/results.md").read_text().splitlines()
    for name, zeta in (("zeta-1.5-ipc2", "1.5"), ("zeta-2.5-ipc2", "2.5")):
        (run_id,) = [r for (r,) in db.execute(
            "select r.run_uuid from runs r join tags a on a.run_uuid = r.run_uuid and a.key = 'dvc.exp_name' "
            "join tags s on s.run_uuid = r.run_uuid and s.key = 'edc.stage' where a.value = ? and "
            "s.value = 'post_evaluate' and r.status = 'FINISHED'", (name,))]
        logged = dict(db.execute("select key, value from latest_metrics where run_uuid = ?", (run_id,)).fetchall())
        assert abs(logged["student.acc_mean"] - shown[name]["acc_mean"]) < 1e-6
        steps = db.execute("select count(*) from metrics m join tags t on t.run_uuid = m.run_uuid and "
                           "t.key = 'mlflow.parentRunId' where t.value = ? and m.key = 'train_loss'",
                           (run_id,)).fetchone()[0]
        assert steps == 2  # one point per epoch, none lost
        m = shown[name]
        assert (f"| zeta = {zeta} | {100 * m['acc_mean']:.2f} ± {100 * m['acc_std']:.2f} "
                f"(raw {100 * m['raw_acc_mean']:.2f}) | {name} |") in report
        assert any(line.startswith(f"| {name} |") and run_id in line for line in report)


@pytest.mark.slow
def test_applications_and_a_failing_stage_under_dvc(dvc_repo):
    """Its own repository, so that pytest-xdist runs it beside the test above."""
    repo, env = dvc_repo
    assert ran(sh(["dvc", "repro"], repo, env)) == {*PIPELINE, *APPS, REFERENCE}
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "lock"], repo, env)

    # The applications, enabled as a user would: only their stages run, and dvc plots draws accuracy
    # against classes seen and against sparsity. A param of one reruns that one alone.
    out = sh(["dvc", "exp", "run", "-S", "continual.enabled=true", "-S", "continual.seeds=1", "-S",
              "slimming.enabled=true", "-S", "slimming.epochs=1", "-n", "apps"], repo, env)
    assert ran(out) == set(APPS)
    cont = read_json(repo / "reports/continual.json")
    assert [s["classes_seen"] for s in cont["steps"]] == [2, 4, 6, 8, 10] * 2
    assert sorted(cont["class_order"]) == list(range(10))
    slim = read_json(repo / "reports/slimming.json")
    assert [r["ratio"] for r in slim["results"]] == [0.3, 0.5, 0.7] and "bn_after" in slim["results"][0]
    plots = json.loads(sh(["dvc", "plots", "show", "--json"], repo, env))
    assert not plots.get("errors"), plots.get("errors")
    for plot_id in ("continual_accuracy", "slimming_accuracy"):
        assert plots["data"].get(plot_id), f"dvc plots show drew nothing for {plot_id}"
    assert ran(sh(["dvc", "exp", "run", "-S", "continual.steps=2", "-n", "apps-two-steps"], repo, env)) == {
        "continual"}
    assert ran(sh(["dvc", "exp", "run", "-S", "slimming.ratios=[0.5]"], repo, env)) == {"slimming"}

    # A stage that fails under DVC: DVC deleted its output before running it (the script itself
    # replaces outputs only on success); the stage's last line says how to get the output back.
    import yaml

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["relabel"]["teachers"] = ["nope"]
    write_yaml(repo / "params.yaml", params)
    out = sh_fails(["dvc", "repro"], repo, env)
    stage_lines = [ln for ln in out.splitlines() if ln.strip() and not ln.startswith("ERROR")]
    assert "`edc restore relabel` puts back" in stage_lines[-1], out
    assert not (repo / "condensed/shards").exists()
    sh(["edc", "restore", "relabel"], repo, env)
    from edc.shards import load_condensed

    assert len(list(load_condensed(repo / "condensed/shards").epoch(0))) > 0
