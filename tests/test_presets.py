"""Presets and sweeps are params values only; the report's tables come from the experiments."""

from __future__ import annotations

import copy
import shutil
from typing import Literal, get_args, get_origin

import pytest

from edc.errors import ParamsError
from edc.params import get_dotted, load_params, parse_params, read_yaml
from edc.presets import (
    PRESET_HELP,
    SWEEPS,
    experiment_name,
    format_value,
    parse_name,
    pinned_keys,
    preset_mismatch,
    preset_overrides,
)
from edc.report import Experiment, build_report
from tests.helpers import ROOT, write_yaml


@pytest.mark.parametrize("name", list(PRESET_HELP))
def test_a_preset_goes_through_dvcs_own_override_parser_to_valid_params(tmp_path, name):
    """What `edc exp preset` passes to `dvc exp run -S` is read back by DVC as the intended values."""
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    base = load_params(params)
    want = preset_overrides(name, base)
    assert set(want) == set(pinned_keys())
    apply_overrides(params, [f"{k}={format_value(v)}" for k, v in want.items()])
    after = read_yaml(params)
    for key, value in want.items():
        assert get_dotted(after, key) == value and type(get_dotted(after, key)) is type(value), key
    parse_params(after)  # every preset is a valid configuration
    before = read_yaml(ROOT / "params.yaml")
    for key in ("dataset", "observers", "seed", "ipc", "continual", "slimming", "evaluate.students"):
        assert get_dotted(after, key) == get_dotted(before, key)  # the workspace's keys do not move


def edited(value, field):
    """Another valid value for a params key, derived from its type in the schema."""
    args = get_args(field.annotation)
    if isinstance(value, bool):
        return not value
    if isinstance(value, str) and args and get_origin(field.annotation) is Literal:
        return next(a for a in args if a != value)
    if value == "all":
        return 7
    if isinstance(value, int) and int in args and "all" in str(field.annotation):
        return "all"
    if isinstance(value, int):
        limits = {type(m).__name__: m for m in field.metadata}
        return value - 1 if "Le" in limits and value + 1 > limits["Le"].le else value + 1
    if isinstance(value, float):
        return value / 2 if value > 0 else 0.5
    if isinstance(value, list) and value and isinstance(value[0], str):
        return value[:1]
    inner = get_args(args[0]) if args and get_origin(args[0]) is Literal else ()
    if isinstance(value, list) and not value and inner:  # an empty list of choices (evaluate.variants)
        return [inner[0]]
    if isinstance(value, list):
        return [0.5]
    raise AssertionError(f"no edit for {value!r}")


def test_a_preset_is_the_same_whatever_else_params_yaml_holds():
    """Every key of the schema but the workspace's (dataset, ipc, seed, trial, machine, observers,
    students, flips, applications) is edited in turn, the edit generated from the key's type; no
    preset's overrides move."""
    from edc.params import Params
    from edc.presets import _leaves

    raw = read_yaml(ROOT / "params.yaml")
    base = parse_params(raw)
    want = {n: preset_overrides(n, base) for n in PRESET_HELP}
    fields = dict(_leaves(Params))
    edited_keys = []
    for key in pinned_keys():
        changed = copy.deepcopy(raw)
        parent = get_dotted(changed, key.rpartition(".")[0]) if "." in key else changed
        leaf = key.rpartition(".")[2]
        parent[leaf] = edited(parent[leaf], fields[key])
        p = parse_params(changed)  # a valid workspace
        assert get_dotted(p.model_dump(), key) != get_dotted(base.model_dump(), key), key
        for name in PRESET_HELP:
            assert preset_overrides(name, p) == want[name], (name, key)
        edited_keys.append(key)
    assert {"synth.class_var", "synth.flatness.weight", "evaluate.ema_rate", "relabel.teachers", "stats.draws",
            "relabel.topk", "synth.ce_weight", "evaluate.schedule"} <= set(edited_keys)


def test_dry_run_prints_the_presets_params_after_a_users_edits(tmp_path, monkeypatch, capsys):
    """As a new user would: edit three keys in params.yaml, then `edc exp preset edc --ipc 1 --dry-run`."""
    from edc.cli import main as edc_main

    raw = read_yaml(ROOT / "params.yaml")
    raw["synth"]["class_var"], raw["synth"]["flatness"]["weight"], raw["evaluate"]["ema_rate"] = "within", 0.3, 0.9
    write_yaml(tmp_path / "params.yaml", raw)
    monkeypatch.chdir(tmp_path)
    edc_main(["exp", "preset", "edc", "--ipc", "1", "--dry-run"])
    cmd = capsys.readouterr().out
    assert "dvc exp run -n edc-ipc1 -S ipc=1 " in cmd
    for flag in ("-S synth.class_var=pooled", "-S synth.flatness.weight=1.0", "-S evaluate.ema_rate=0.99"):
        assert flag in cmd
    assert cmd.count(" -S ") == 1 + len(pinned_keys())


def test_every_method_row_is_evaluated_under_one_protocol():
    p = load_params(ROOT / "params.yaml")
    presets = {n: preset_overrides(n, p) for n in PRESET_HELP}
    protocol = [k for k in pinned_keys() if k.startswith(("relabel.", "evaluate.")) or k == "zeta"]
    for name, v in presets.items():
        differs = {k for k in protocol if v[k] != presets["edc"][k]}
        if name == "random-hard":
            assert differs == {"evaluate.labels"}
        elif name == "sre2l-own-eval":
            assert differs == {"relabel.epochs", "relabel.min_steps", "relabel.batch_size", "evaluate.schedule",
                               "zeta", "evaluate.ema"}
            assert {k for k in pinned_keys() if v[k] != presets["sre2l"][k]} == differs  # the same images
        else:
            assert not differs, name
    assert presets["edc"]["relabel.teachers"] == [m.name for m in p.observers.models]


def test_sre2l_is_its_public_recover_script_value_by_value():
    """VILA-Lab/SRe2L small_dataset/recover_cifar.{py,sh}."""
    p = load_params(ROOT / "params.yaml")
    v = preset_overrides("sre2l", p)
    script = {"init.method": "noise", "synth.iterations": 1000, "synth.lr": 0.25, "synth.lr_schedule": "cosine",
              "synth.r_bn": 0.01, "synth.first_layer_weight": 10.0, "synth.layers": "sum", "alpha": 1.0,
              "synth.targets": "running", "synth.aug.kind": "jitter", "synth.aug.jitter": 4,
              "synth.flatness.mode": "off", "synth.class_views": 1, "synth.observers": ["resnet18"],
              "synth.ce_weight": 1.0, "synth.batch_size": 10}
    assert {k: v[k] for k in script} == script


def test_edc_paper_and_the_baselines_say_what_their_sources_print():
    p = load_params(ROOT / "params.yaml")
    edc, paper, rded, gvbsm = (preset_overrides(n, p) for n in ("edc", "edc-paper", "rded", "gvbsm"))
    # Tables 8-10 (CIFAR-10's 75 iterations at batch All), Table 4's flatness weight, one crop per image,
    # statistics of the original images
    assert {k: paper[k] for k in ("init.method", "synth.iterations", "synth.batch_size", "synth.lr", "alpha",
                                  "synth.class_views", "stats.augment", "synth.flatness.weight",
                                  "synth.flatness.beta", "synth.flatness.tau", "synth.aug.scale_min")} == \
        {"init.method": "real", "synth.iterations": 75, "synth.batch_size": "all", "synth.lr": 0.05, "alpha": 0.5,
         "synth.class_views": 1, "stats.augment": False, "synth.flatness.weight": 0.25, "synth.flatness.beta": 0.99,
         "synth.flatness.tau": 4.0, "synth.aug.scale_min": 0.5}
    # RDED's CIFAR scripts: 300 images per class, 5 patches each, factor 1, crops of 0.08-1, one scorer
    assert (rded["init.method"], rded["init.candidates"], rded["init.crops"], rded["init.factor"],
            rded["init.scale_min"], rded["init.observers"], rded["synth.iterations"]) == \
        ("rded", 300, 5, 1, 0.08, ["resnet18"], 0)
    # G-VBSM as EDC's baseline: noise, global matching, all backbones, 0.08 crops, twice edc-paper's iterations
    assert (gvbsm["init.method"], gvbsm["alpha"], gvbsm["synth.observers"], gvbsm["synth.aug.scale_min"],
            gvbsm["synth.flatness.mode"], gvbsm["synth.iterations"]) == \
        ("noise", 1.0, [m.name for m in p.observers.models], 0.08, "off", 2 * paper["synth.iterations"])
    # The defaults are the edc preset: `dvc repro` on a fresh clone is the project's recipe.
    assert all(get_dotted(read_yaml(ROOT / "params.yaml"), k) == v for k, v in edc.items())
    soft, hard = preset_overrides("random-soft", p), preset_overrides("random-hard", p)
    assert soft["synth.iterations"] == hard["synth.iterations"] == 0 and soft["init.method"] == "real"
    with pytest.raises(ParamsError, match="unknown preset 'dsa'"):
        preset_overrides("dsa", p)


def test_preset_mismatch_names_each_key_that_differs_and_the_report_shows_it(tmp_path):
    raw = read_yaml(ROOT / "params.yaml")
    assert preset_mismatch("edc", raw) == []
    changed = copy.deepcopy(raw)
    changed["synth"]["class_var"], changed["evaluate"]["ema_rate"] = "within", 0.9
    assert preset_mismatch("edc", changed) == ["synth.class_var: 'within' (preset: 'pooled')",
                                               "evaluate.ema_rate: 0.9 (preset: 0.99)"]
    assert "alpha: 0.5 (preset: 1.0)" in preset_mismatch("sre2l", raw)
    changed["ipc"], changed["seed"] = 1, 5  # the workspace's keys are not the preset's business
    assert len(preset_mismatch("edc", changed)) == 2
    exps = {e.name: e for e in [exp("edc-ipc10", {"convnet": (0.9, 0.01)}, raw),
                                exp("random-soft-ipc10", {"convnet": (0.8, 0.01)}, changed)]}
    lines = build_report(exps, None).splitlines()
    notes = [ln for ln in lines if ln.startswith("- ") and "preset's params" in ln]
    assert len(notes) == 1 and notes[0].startswith("- random-soft-ipc10: not the random-soft preset's params: ")
    assert "synth.iterations: 300 (preset: 0)" in notes[0] and "synth.class_var" in notes[0]
    # trials that differ alike share one line (a preset changed since they ran: one key, every trial)
    alike = {e.name: e for e in [exp(f"edc-ipc10-t{k}", {"convnet": (0.9, 0.01)}, {**changed, "trial": k})
                                 for k in range(3)]}
    notes = [ln for ln in build_report(alike, None).splitlines() if "preset's params" in ln]
    assert len(notes) == 1 and notes[0].startswith("- edc-ipc10-t0, edc-ipc10-t1, edc-ipc10-t2: not the edc ")


def test_a_users_set_param_replaces_the_presets_value(tmp_path, monkeypatch, capsys):
    from edc.cli import main as edc_main

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    edc_main(["exp", "preset", "sre2l", "--dry-run", "-S", "synth.iterations=7", "-S", "evaluate.seeds=1"])
    cmd = capsys.readouterr().out
    assert "-S synth.iterations=7" in cmd and "synth.iterations=300" not in cmd and "-S evaluate.seeds=1" in cmd
    assert "dvc exp run -n sre2l-ipc10 " in cmd and "-S alpha=1.0" in cmd


def test_experiment_names_parse_back():
    for name in PRESET_HELP:
        assert parse_name(experiment_name(name, 10)) == (name, None, 10)
    for sweep, s in SWEEPS.items():
        for v in s.values:
            kind, label, ipc = parse_name(experiment_name(sweep, 1, v))
            assert (kind, ipc) == (sweep, 1) and label == format_value(v)
    assert parse_name("my-own-run") is None and parse_name("edc-ipcx") is None


def exp(name: str, accs: dict[str, tuple[float, float]], params: dict | None = None, ok: bool | None = True):
    metrics = {s: {"acc_mean": m, "acc_std": sd, "seeds": {"0": m, "1": m, "2": m}} for s, (m, sd) in accs.items()}
    e = Experiment(name, "abcdef0123", "2026-11-28T05:00:00", params or read_yaml(ROOT / "params.yaml"), metrics)
    e.mlflow_run, e.mlflow_ok = ("run1" if ok is not None else None), ok
    return e


def test_report_tables_hold_the_experiments_numbers(tmp_path):
    base = read_yaml(ROOT / "params.yaml")
    exps = {e.name: e for e in [
        exp("edc-ipc10", {"convnet": (0.9767, 0.0015), "resnet18": (0.95, 0.01)}, base),
        exp("sre2l-ipc10", {"convnet": (0.9012, 0.0101), "resnet18": (0.88, 0.02)}, ok=False),
        exp("alpha-0.0-ipc10", {"convnet": (0.97, 0.002), "resnet18": (0.94, 0.0)}),
        exp("alpha-1.0-ipc10", {"convnet": (0.96, 0.003), "resnet18": (0.93, 0.0)}),
        exp("edc-ipc1", {"convnet": (0.80, 0.02), "resnet18": (0.7, 0.03)}, ok=None),
    ]}
    text = build_report(exps, tmp_path / "plots", tmp_path)
    lines = text.splitlines()
    assert "| edc | 97.67 ± 0.15 | 95.00 ± 1.00 | edc-ipc10 |" in lines
    assert "| sre2l | 90.12 ± 1.01 (!) | 88.00 ± 2.00 (!) | sre2l-ipc10 |" in lines
    # The alpha sweep takes its 0.5 point from the edc preset, in the sweep's order.
    sweep = [ln for ln in lines if ln.startswith("| alpha = ")]
    assert sweep == ["| alpha = 0.0 | 97.00 ± 0.20 | 94.00 ± 0.00 | alpha-0.0-ipc10 |",
                     "| alpha = 0.5 | 97.67 ± 0.15 | 95.00 ± 1.00 | edc-ipc10 |",
                     "| alpha = 1.0 | 96.00 ± 0.30 | 93.00 ± 0.00 | alpha-1.0-ipc10 |"]
    assert (tmp_path / "plots/alpha-ipc10.png").stat().st_size > 1000
    assert (tmp_path / "plots/ipc.png").exists() and "![alpha sweep at ipc 10](plots/alpha-ipc10.png)" in lines
    assert any("## Methods at ipc 1 " in ln for ln in lines) and "zeta" not in text.split("## Experiments")[0]
    assert "| edc-ipc1 | abcdef0 | 2026-11-28T05:00:00 | none (restored from the run-cache?) |" in lines
    assert "No experiments found" in build_report({}, None)


def test_report_shows_the_raw_weights_next_to_an_ema_evaluation(tmp_path):
    base = read_yaml(ROOT / "params.yaml")
    ema = exp("edc-ipc1", {"convnet": (0.81, 0.01)}, base)
    ema.metrics["convnet"]["raw_acc_mean"] = 0.85
    no_ema = exp("sre2l-ipc1", {"convnet": (0.25, 0.01)}, {**base, "evaluate": {**base["evaluate"], "ema": False}})
    no_ema.metrics["convnet"]["raw_acc_mean"] = 0.25
    lines = build_report({e.name: e for e in (ema, no_ema)}, None).splitlines()
    assert "| edc | 81.00 ± 1.00 (raw 85.00) | edc-ipc1 |" in lines and "| sre2l | 25.00 ± 1.00 | sre2l-ipc1 |" in lines


def test_report_reads_finished_experiments_and_skips_queued_and_running(monkeypatch):
    """`dvc exp show --json` keeps an executor entry on experiments: "success" after a queue run."""
    import json
    import subprocess

    from edc import report

    params = read_yaml(ROOT / "params.yaml")

    def entry(name, state, acc, ts):
        metrics = {"reports/metrics.json": {"data": {"convnet": {"acc_mean": acc, "acc_std": 0.0, "seeds": {}}}}}
        return {"executor": None if state is None else {"state": state},
                "revs": [{"rev": name * 3, "name": name, "data": {"timestamp": ts, "metrics": metrics,
                                                                 "params": {"params.yaml": {"data": params}}}}]}

    shown = [{"rev": "abc", "experiments": [entry("edc-ipc10", "success", 0.9, "2026-01-02"),
                                            entry("edc-ipc1", None, 0.5, "2026-01-01"),
                                            entry("zeta-1.5-ipc10", "running", 0.1, "2026-01-03"),
                                            entry("zeta-2.5-ipc10", "queued", 0.1, "2026-01-03")]},
             {"rev": "old", "experiments": [entry("edc-ipc10", None, 0.8, "2026-01-01")]}]
    monkeypatch.setattr(report, "dvc_command", lambda: "dvc")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, json.dumps(shown), ""))
    exps = report.read_experiments(".")
    assert sorted(exps) == ["edc-ipc1", "edc-ipc10"]
    assert exps["edc-ipc10"].metrics["convnet"]["acc_mean"] == 0.9  # the newest of two with one name


def test_a_sweep_names_its_best_value_on_the_validation_split_never_the_test_split(tmp_path):
    base = read_yaml(ROOT / "params.yaml")

    def with_val(e, vals):
        for s, v in vals.items():
            e.metrics[s]["val_acc_mean"] = v
        return e

    # alpha 0.0 has the best test accuracy, alpha 1.0 the best mean validation accuracy
    exps = {e.name: e for e in [
        with_val(exp("edc-ipc10", {"convnet": (0.96, 0.0), "resnet18": (0.95, 0.0)}, base),
                 {"convnet": 0.90, "resnet18": 0.90}),
        with_val(exp("alpha-0.0-ipc10", {"convnet": (0.99, 0.0), "resnet18": (0.99, 0.0)}),
                 {"convnet": 0.80, "resnet18": 0.85}),
        with_val(exp("alpha-1.0-ipc10", {"convnet": (0.90, 0.0), "resnet18": (0.90, 0.0)}),
                 {"convnet": 0.95, "resnet18": 0.91}),
    ]}
    lines = build_report(exps, None, tmp_path).splitlines()
    assert "Best on the validation split: **alpha = 1.0** (mean validation accuracy over the students 93.00 %)." \
        in lines
    assert "| alpha = 1.0 | 90.00 ± 0.00 [val 95.00] | 90.00 ± 0.00 [val 91.00] | alpha-1.0-ipc10 |" in lines
    del exps["alpha-0.0-ipc10"].metrics["resnet18"]["val_acc_mean"]  # one point without validation: no choice
    assert any(ln.startswith("No validation accuracy") for ln in build_report(exps, None, tmp_path).splitlines())


def test_a_sweep_of_a_key_the_preset_does_not_set_takes_the_edc_points_value_from_its_params(tmp_path):
    base = read_yaml(ROOT / "params.yaml")
    exps = {e.name: e for e in [exp("edc-ipc1", {"convnet": (0.9, 0.0)}, base),
                                exp("flat_weight-0.25-ipc1", {"convnet": (0.8, 0.0)})]}
    rows = [ln for ln in build_report(exps, None, tmp_path).splitlines() if ln.startswith("| synth.flatness.weight = ")]
    assert rows == ["| synth.flatness.weight = 0.25 | 80.00 ± 0.00 | flat_weight-0.25-ipc1 |",
                    f"| synth.flatness.weight = {base['synth']['flatness']['weight']} | 90.00 ± 0.00 | edc-ipc1 |"]


def test_report_has_a_table_and_a_plot_per_application(tmp_path):
    e = exp("edc-ipc1", {"convnet": (0.9, 0.01)})
    e.continual = {"enabled": True, "steps": [
        {"labels": "soft", "classes_seen": 2, "acc_mean": 0.99, "acc_std": 0.0},
        {"labels": "soft", "classes_seen": 4, "acc_mean": 0.95, "acc_std": 0.01},
        {"labels": "hard", "classes_seen": 2, "acc_mean": 0.9, "acc_std": 0.02},
        {"labels": "hard", "classes_seen": 4, "acc_mean": 0.8, "acc_std": 0.03}]}
    e.slimming = {"enabled": True, "model": "convnet", "unpruned_acc": 0.98, "results": [
        {"ratio": 0.5, "bn_before": 0.3, "bn_after": 0.9, "magnitude_before": 0.7, "magnitude_after": 0.95}]}
    lines = build_report({e.name: e}, tmp_path / "plots", tmp_path).splitlines()
    assert "| experiment | labels | 2 classes | 4 classes |" in lines
    assert "| edc-ipc1 | soft | 99.00 ± 0.00 | 95.00 ± 1.00 |" in lines
    assert "| edc-ipc1 | hard | 90.00 ± 2.00 | 80.00 ± 3.00 |" in lines
    assert "| edc-ipc1 | convnet (98.00) | 50% | 30.00 -> 90.00 | 70.00 -> 95.00 |" in lines
    assert (tmp_path / "plots/continual.png").exists() and (tmp_path / "plots/slimming.png").exists()


def test_a_sweep_winner_inside_the_seed_spread_is_called_noise(tmp_path):
    base = read_yaml(ROOT / "params.yaml")

    def with_val(e, val, std):
        for m in e.metrics.values():
            m.update(val_acc_mean=val, val_acc_std=std)
        return e

    edc = with_val(exp("edc-ipc1", {"convnet": (0.90, 0.01)}, base), 0.897, 0.006)
    near = with_val(exp("zeta-3.0-ipc1", {"convnet": (0.90, 0.01)}), 0.901, 0.002)
    far = with_val(exp("alpha-1.0-ipc1", {"convnet": (0.95, 0.01)}), 0.93, 0.002)
    text = build_report({e.name: e for e in (edc, near, far)}, None)
    zeta = next(ln for ln in text.splitlines() if ln.startswith("Best on the validation split: **zeta"))
    assert "(0.40 points) is less than the preset's seed spread on validation (0.60): noise" in zeta
    alpha = next(ln for ln in text.splitlines() if ln.startswith("Best on the validation split: **alpha"))
    assert "leads the edc preset's 0.5 by 3.30 points, more than its seed spread" in alpha


def test_trials_are_named_experiments_with_the_trial_param(tmp_path, monkeypatch, capsys):
    from edc.cli import main as edc_main

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    edc_main(["exp", "preset", "edc", "--ipc", "1", "--trials", "3", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" -n ")[1].split()[0] for line in lines] == ["edc-ipc1-t0", "edc-ipc1-t1", "edc-ipc1-t2"]
    assert [line.count("-S trial=") for line in lines] == [1, 1, 1]
    assert all(f"-S trial={k}" in line for k, line in enumerate(lines))
    # without --trials, one experiment as before, no trial key
    edc_main(["exp", "preset", "edc", "--ipc", "1", "--dry-run"])
    out = capsys.readouterr().out
    assert " -n edc-ipc1 " in out and "trial" not in out
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit) as exc:
            edc_main(["exp", "preset", "edc", "--trials", bad, "--dry-run"])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "argument --trials: must be an integer" in err[-1] and err[-1].endswith(f"(got {bad!r})")
    # a trial's name parses back to its preset and ipc (the trial itself is the experiment's param)
    assert parse_name(experiment_name("random-soft", 1) + "-t4") == ("random-soft", None, 1)
    assert parse_name(experiment_name("alpha", 10, 0.25) + "-t0") == ("alpha", "0.25", 10)
    assert parse_name("edc-ipc1-tx") is None
    with pytest.raises(SystemExit):
        edc_main(["exp", "preset", "edc", "--trials", "2", "-S", "trial=3", "--dry-run"])
    assert capsys.readouterr().err.strip() == "--trials sets the param trial of each experiment; remove -S trial=..."
