"""The pipeline end to end: as scripts, and through DVC in a throwaway repository."""

from __future__ import annotations

import csv
import io
import json
import runpy
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edc.imageset import read_imageset
from edc.io import md5_file, read_json
from edc.stats import load_stats
from tests.conftest import ROOT, sh, tiny_params, write_yaml


def stage(name: str):
    return runpy.run_path(str(ROOT / "stages" / f"{name}.py"), run_name="edc_test")["main"]


def run_stages(work: Path, params: Path) -> None:
    p = ["--params", str(params)]
    stage("prepare")([*p, "--out", str(work / "data/prepared")])
    stage("train_observers")([*p, "--data", str(work / "data/prepared"), "--out", str(work / "models/observers"),
                              "--report", str(work / "reports/observers.json"),
                              "--plots", str(work / "reports/plots/observers")])
    stage("collect_stats")([*p, "--data", str(work / "data/prepared"), "--observers", str(work / "models/observers"),
                            "--out", str(work / "stats"), "--report", str(work / "reports/stats.json")])
    stage("init")([*p, "--data", str(work / "data/prepared"), "--observers", str(work / "models/observers"),
                   "--out", str(work / "condensed/init"), "--grid", str(work / "reports/init_grid.png")])
    stage("synthesize")([*p, "--data", str(work / "data/prepared"), "--init", str(work / "condensed/init"),
                         "--observers", str(work / "models/observers"), "--stats", str(work / "stats"),
                         "--out", str(work / "condensed/images"), "--report", str(work / "reports/synth.json"),
                         "--curves", str(work / "reports/plots/synth_loss.csv"),
                         "--grid", str(work / "reports/synth_grid.png")])
    stage("relabel")([*p, "--data", str(work / "data/prepared"), "--images", str(work / "condensed/images"),
                      "--observers", str(work / "models/observers"), "--out", str(work / "condensed/shards"),
                      "--report", str(work / "reports/relabel.json")])
    stage("post_evaluate")([*p, "--data", str(work / "data/prepared"), "--shards", str(work / "condensed/shards"),
                            "--metrics", str(work / "reports/metrics.json"),
                            "--curves", str(work / "reports/plots/evaluate"),
                            "--accuracy", str(work / "reports/plots/accuracy")])


def md5_tree(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): md5_file(f) for f in sorted(root.rglob("*")) if f.is_file()}


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
        "condensed/shards/epoch-0000.tar", "condensed/shards/epoch-0001.tar", "condensed/shards/images-000000.tar",
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
    assert ema[0] == raw[0] == "epoch,test_acc" and len(ema) == len(raw) == 1 + 2  # eval_every 1, 2 epochs
    assert float(raw[-1].split(",")[1]) == metrics["raw_acc_mean"]
    stored = read_json(a / "reports/relabel.json")["bytes"]
    shards = a / "condensed/shards"
    assert stored["total"] == sum(f.stat().st_size for f in shards.glob("*.tar"))


def test_post_evaluate_names_a_bad_shard(tmp_path):
    params = write_yaml(tmp_path / "params.yaml", tiny_params())
    run_stages(tmp_path, params)
    shard = tmp_path / "condensed/shards/epoch-0001.tar"
    shard.unlink()
    r = subprocess.run([sys.executable, "stages/post_evaluate.py", "--params", str(params), "--data",
                        str(tmp_path / "data/prepared"), "--shards", str(tmp_path / "condensed/shards"), "--metrics",
                        str(tmp_path / "m.json"), "--curves", str(tmp_path / "curves")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == f"{shard}: missing (meta.json lists 2 epochs)", r.stderr
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "curves").exists()


def test_a_failing_stage_keeps_the_earlier_output(tmp_path, default_params):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "facts.json").write_text("earlier")
    default_params["dataset"].update(name="cifar10", root=str(tmp_path / "missing"))
    params = write_yaml(tmp_path / "params.yaml", default_params)
    r = subprocess.run([sys.executable, "stages/prepare.py", "--params", str(params), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().endswith("missing does not exist"), r.stderr
    assert (out / "facts.json").read_text() == "earlier" and len(list(tmp_path.iterdir())) == 2


# --- through DVC ---------------------------------------------------------------------------------

STAGES = ("prepare", "train_observers", "collect_stats", "init", "synthesize", "relabel", "post_evaluate")
APPS = ("continual", "slimming")  # off by default: they run, write "enabled: false", and log nothing


def ran(output: str) -> set[str]:
    return {s for s in STAGES + APPS if f"Running stage '{s}'" in output}


def lock_outs(repo: Path) -> dict[str, str]:
    from ruamel.yaml import YAML

    lock = YAML(typ="safe").load((repo / "dvc.lock").read_text())
    return {f"{name}:{o['path']}": o["md5"] for name, s in lock["stages"].items() for o in s.get("outs", [])}


@pytest.mark.slow
def test_dvc_repro_is_deterministic_cached_and_tracked(dvc_repo):
    repo, env = dvc_repo
    out = sh(["dvc", "repro"], repo, env)
    assert ran(out) == set(STAGES + APPS)
    first = lock_outs(repo)
    assert {k for k in first if not k.split(":")[1].startswith("reports")} == {
        "prepare:data/prepared", "train_observers:models/observers", "collect_stats:stats", "init:condensed/init",
        "synthesize:condensed/images", "relabel:condensed/shards"}

    # Nothing changed: nothing runs.
    assert ran(sh(["dvc", "repro"], repo, env)) == set()

    # From scratch again, without the run-cache: the same bytes.
    sh(["dvc", "repro", "--force", "--no-run-cache"], repo, env)
    assert lock_outs(repo) == first

    # An observers param reruns train_observers and collect_stats, not prepare.
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "lock"], repo, env)
    # A fresh clone shows the committed run's metrics and plots with DVC alone (they are in git).
    clone = repo.parent / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], repo.parent, env)
    shown = sh(["dvc", "metrics", "show", "--json"], clone, env)
    assert "failed" not in shown.lower(), shown
    assert json.loads(shown)[""]["data"]["reports/metrics.json"]["data"]["student"]["acc_mean"] == read_json(
        repo / "reports/metrics.json")["student"]["acc_mean"]
    plots = sh(["dvc", "plots", "show", "--json"], clone, env)
    assert "errors" not in json.loads(plots) or not json.loads(plots)["errors"], plots
    out = sh(["dvc", "exp", "run", "-S", "observers.epochs=2", "-n", "two-epochs"], repo, env)
    assert ran(out) == set(STAGES + APPS) - {"prepare"}
    assert read_json(repo / "models/observers/tiny.json")["training"]["epochs"] == 2

    # alpha reruns synthesize and what follows it, nothing upstream.
    out = sh(["dvc", "exp", "run", "-S", "alpha=0.25", "-n", "alpha-quarter"], repo, env)
    assert ran(out) == {"synthesize", "relabel", "post_evaluate", *APPS}
    assert read_json(repo / "condensed/images/meta.json")["alpha"] == 0.25

    # zeta reruns post_evaluate (and continual, which trains students with the same recipe).
    out = sh(["dvc", "exp", "run", "-S", "zeta=1.5", "-n", "zeta-one-half"], repo, env)
    assert ran(out) == {"post_evaluate", "continual"}
    # dvc exp show lists alpha, zeta and the accuracy of every experiment side by side.
    rows = {r["Experiment"]: r for r in csv.DictReader(io.StringIO(sh(["dvc", "exp", "show", "--no-pager", "--csv"],
                                                                         repo, env)))}
    # (each `dvc exp run` starts from the workspace the previous one left, so zeta-one-half keeps alpha 0.25)
    for name, alpha, zeta in (("alpha-quarter", "0.25", "2.0"), ("zeta-one-half", "0.25", "1.5")):
        assert (rows[name]["alpha"], rows[name]["zeta"]) == (alpha, zeta)
        assert 0 <= float(rows[name]["student.acc_mean"]) <= 1, rows[name]

    # MLflow: the default store under the repository root, one run per stage execution, tagged.
    db = sqlite3.connect(repo / "mlflow.db")
    runs = db.execute("select r.run_uuid, r.status, t.value from runs r join tags t on t.run_uuid = r.run_uuid "
                      "and t.key = 'edc.stage'").fetchall()
    stages = [s for _, _, s in runs]
    expected = list(STAGES) * 2 + [s for s in STAGES if s != "prepare"] + ["synthesize", "relabel", "post_evaluate",
                                                                          "post_evaluate"]
    assert sorted(stages) == sorted(expected)
    assert {status for _, status, _ in runs} == {"FINISHED"}
    exp_tags = sorted(v for (v,) in db.execute(
        "select t.value from tags t join tags s on s.run_uuid = t.run_uuid and s.key = 'edc.stage' "
        "where t.key = 'dvc.exp_name'").fetchall())
    assert exp_tags == ["alpha-quarter"] * 3 + ["two-epochs"] * 6 + ["zeta-one-half"]
    # One parent run per pipeline run that ran a stage (two `dvc repro`; the no-op one ran nothing,
    # and three `dvc exp run`), FINISHED, holding its stage runs; post-evaluation's student/seed runs
    # nested under the stage run.
    parent_of = dict(db.execute("select run_uuid, value from tags where key = 'mlflow.parentRunId'").fetchall())
    pipelines = dict(db.execute("select r.run_uuid, r.status from runs r join tags t on t.run_uuid = r.run_uuid "
                                "and t.key = 'edc.pipeline'").fetchall())
    assert len(pipelines) == 5 and set(pipelines.values()) == {"FINISHED"}
    assert {parent_of.get(run_id) in pipelines for run_id, _, _ in runs} == {True}
    for name, n_stages in (("alpha-quarter", 3), ("two-epochs", 6), ("zeta-one-half", 1)):
        (parent,) = [r for (r,) in db.execute(
            "select t.run_uuid from tags t join tags p on p.run_uuid = t.run_uuid and p.key = 'edc.pipeline' "
            "where t.key = 'dvc.exp_name' and t.value = ?", (name,))]
        assert list(parent_of.values()).count(parent) == n_stages
    (post,) = [r for (r,) in db.execute(
        "select t.run_uuid from tags t join tags s on s.run_uuid = t.run_uuid and s.key = 'edc.stage' "
        "and s.value = 'post_evaluate' where t.key = 'dvc.exp_name' and t.value = 'zeta-one-half'")]
    seed_runs = [r for r, parent in parent_of.items() if parent == post]
    assert len(seed_runs) == 1
    assert db.execute("select name from runs where run_uuid = ?", seed_runs).fetchone()[0] == "student seed 0"
    assert db.execute("select count(*) from metrics where run_uuid = ? and key = 'train_loss'",
                      seed_runs).fetchone()[0] == 2
    # The set's card is an artifact of the relabel run, and the set an input of post_evaluate.
    (relabel,) = [r for (r,) in db.execute(
        "select t.run_uuid from tags t join tags s on s.run_uuid = t.run_uuid and s.key = 'edc.stage' "
        "and s.value = 'relabel' where t.key = 'dvc.exp_name' and t.value = 'alpha-quarter'")]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    assert "condensed_set/meta.json" in [a.path for a in client.list_artifacts(relabel, "condensed_set")]
    inputs = client.get_run(post).inputs.dataset_inputs
    assert [i.dataset.digest for i in inputs] == [read_json(repo / "condensed/shards/meta.json")["set_id"][:36]]
    epochs = db.execute("select value from params where key = 'observers.epochs'").fetchall()
    assert sorted(json.loads(v) for (v,) in epochs) == [1, 1, 2]

    # Two sweep points queued and run at once (`dvc queue start -j 2`): no MLflow run or metric is
    # lost, and `edc report` shows the numbers `dvc exp show` and MLflow hold for them.
    edc = [sys.executable, "-m", "edc.cli"]
    sh([*edc, "exp", "sweep", "zeta", "--values", "1.5", "2.5", "--queue", "-S", "synth.iterations=4",
        "-S", "relabel.batch_size=8"], repo, env)
    sh(["dvc", "queue", "start", "-j", "2"], repo, env)
    import time

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
    assert ran(sh(["dvc", "repro"], repo, env)) == set(STAGES + APPS)
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
    r = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode != 0
    stage_lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip() and not ln.startswith("ERROR")]
    assert "`dvc checkout relabel` puts back" in stage_lines[-1], r.stdout + r.stderr
    assert not (repo / "condensed/shards").exists()
    sh(["dvc", "checkout", "relabel"], repo, env)
    from edc.shards import load_condensed

    assert len(list(load_condensed(repo / "condensed/shards").epoch(0))) > 0
