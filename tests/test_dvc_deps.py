"""dvc.yaml's code dependencies cover every module a stage runs, so `dvc repro` reruns what changed."""

from __future__ import annotations

import re
import textwrap

import pytest
import yaml

from edc.codedeps import closure, package_digest, uncovered
from edc.resume import fingerprint
from tests.helpers import ROOT, run


def stage_scripts() -> dict[str, tuple[str, list[str]]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, st in stages.items():
        scripts = re.findall(r"stages/\w+\.py", st["cmd"])
        assert len(scripts) == 1, f"stage {name}: expected one stage script in its cmd, found {scripts}"
        out[name] = (scripts[0], st["deps"])
    return out


@pytest.mark.parametrize("stage", sorted(stage_scripts()))
def test_each_stage_lists_its_whole_import_closure(stage):
    script, deps = stage_scripts()[stage]
    missing = uncovered(script, deps)
    assert not missing, f"dvc.yaml stage {stage} runs {missing} but does not list it under deps:"


def test_the_closure_follows_every_kind_of_import(tmp_path):
    """Absolute, `from pkg import module`, relative and function-level imports, with package inits;
    nothing outside the package, nothing only type checkers read, and a cycle terminates."""
    files = {
        "edc/__init__.py": "",
        "edc/a.py": "import os\nfrom typing import TYPE_CHECKING\nfrom edc import b\nif TYPE_CHECKING:\n"
                    "    from edc.unused import T\nelse:\n    T = None\n",
        "edc/b.py": "def f():\n    from .sub.c import g\n    return g\n",
        "edc/sub/__init__.py": "",
        "edc/sub/c.py": "import edc.d\nfrom ..a import x\ng = 1\n",
        "edc/d.py": "import torch\n",
        "edc/unused.py": "",
        "stages/s.py": "from edc.a import thing\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text))
    got = [p.as_posix() for p in closure("stages/s.py", tmp_path)]
    assert got == ["edc/__init__.py", "edc/a.py", "edc/b.py", "edc/d.py", "edc/sub/__init__.py", "edc/sub/c.py"]
    assert uncovered("stages/s.py", ["stages/s.py", "edc/__init__.py", "edc/a.py", "edc/sub"], tmp_path) == [
        "edc/b.py", "edc/d.py"]
    assert uncovered("stages/s.py", ["stages/s.py", "edc"], tmp_path) == []
    assert uncovered("stages/s.py", ["edc/"], tmp_path) == ["stages/s.py"]


def test_removing_a_dep_from_dvc_yaml_is_caught():
    script, deps = stage_scripts()["synthesize"]
    assert uncovered(script, [d for d in deps if d != "edc/synth.py"]) == ["edc/synth.py"]
    assert "edc/data/prepared.py" in uncovered(script, [d for d in deps if d != "edc/data"])


def test_a_resume_fingerprint_changes_with_the_code(tmp_path):
    (tmp_path / "edc").mkdir()
    (tmp_path / "edc/__init__.py").write_text("")
    (tmp_path / "edc/m.py").write_text("X = 1\n")
    (tmp_path / "edc/other.py").write_text("Y = 1\n")
    (tmp_path / "stage.py").write_text("from edc.m import X\n")
    digests = [package_digest("stage.py", tmp_path)]
    for path, text in (("edc/m.py", "X = 2\n"), ("edc/other.py", "Y = 2\n"), ("stage.py", "from edc.m import X  # \n"),
                       ("edc/sub/new.py", "")):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text(text)
        digests.append(package_digest("stage.py", tmp_path))
    assert len(set(digests)) == len(digests), "every edit of the script or of any module is a new digest"
    (tmp_path / "notes.txt").write_text("not code")
    assert package_digest("stage.py", tmp_path) == digests[-1]
    real = ROOT / "stages" / "synthesize.py"
    assert fingerprint("s", {}, [], code=real) != fingerprint("s", {}, [])
    assert fingerprint("s", {}, [], code=real) == fingerprint("s", {}, [], code=real)


def test_the_format_imports_nothing_of_the_method():
    """Reading a condensed set (edc.shards, its plan replay in edc.plan) needs no method module."""
    method = {"edc/relabel.py", "edc/synth.py", "edc/synth_views.py", "edc/stats.py", "edc/init.py",
              "edc/evaluate.py", "edc/observers.py", "edc/crosseval.py"}
    for module in ("edc/shards.py", "edc/plan.py"):
        got = {p.as_posix() for p in closure(module)}
        assert not got & method, f"{module} imports {sorted(got & method)}"
        assert not any(p.startswith("edc/models") for p in got), module


# What the data and model packages may import: the project's plumbing, never tracking, the format or
# the method, so that an edit above them reruns no stage that only reads data (prepare).
BASE = {"edc/__init__.py", "edc/errors.py", "edc/io.py", "edc/seeding.py", "edc/progress.py"}


def test_data_and_models_import_only_the_plumbing():
    for folder in ("edc/data", "edc/models"):
        for f in sorted((ROOT / folder).glob("*.py")):
            got = {p.as_posix() for p in closure(f)}
            outside = {p for p in got if not p.startswith(("edc/data/", "edc/models/"))} - BASE
            assert not outside, f"{f.relative_to(ROOT)} imports {sorted(outside)}"


def test_importing_data_and_models_loads_no_tracking():
    """At run time too (what the static closure cannot see: a registry or plugin import)."""
    import sys

    code = ("import pkgutil, sys, importlib, edc.data, edc.models\n"
            "for pkg in (edc.data, edc.models):\n"
            "    for m in pkgutil.iter_modules(pkg.__path__):\n"
            "        importlib.import_module(f'{pkg.__name__}.{m.name}')\n"
            "print(sorted(m for m in sys.modules if m == 'mlflow' or m.startswith(('edc.tracking', 'mlflow.'))))\n")
    r = run([sys.executable, "-c", code], timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


# The package's layers, lowest first: a module imports its own layer and those below, never above.
LAYERS = [
    ("plumbing", {"errors", "io", "seeding", "progress", "runtime", "codedeps", "distributed", "schedules",
                  "randaugment", "optim"}),
    ("data, models and their configuration", {"data", "models", "params"}),
    ("format", {"plan", "shards", "imageset", "export"}),
    ("method", {"training", "observers", "stats", "synth", "synth_views", "synth_reference", "init", "relabel",
                "evaluate", "crosseval", "applications", "resume"}),
    ("stages and the command line", {"tracking", "stage", "presets", "report", "restore", "summary", "smoke",
                                     "dvcqueue", "cli"}),
]


def test_the_import_graph_runs_from_data_to_format_to_method_to_stages():
    from edc.codedeps import imported_modules

    def level(module: str) -> int:
        found = [i for i, (_, names) in enumerate(LAYERS) if module.split(".")[1] in names]
        assert found, f"{module}: a new module; give it its layer in LAYERS"
        return found[0]

    files = [f for f in (ROOT / "edc").rglob("*.py") if f.name != "__init__.py" or f.parent.name != "edc"]
    for f in files:
        rel = f.relative_to(ROOT).with_suffix("")
        mod = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        here = level(mod)
        for dep in imported_modules(f):
            if dep != "edc" and level(dep) > here:
                raise AssertionError(f"{mod} ({LAYERS[here][0]}) imports {dep} ({LAYERS[level(dep)][0]})")


def test_prepare_does_not_rerun_for_method_code():
    """An edit to activation fusion, the optimizers or synthesis's views leaves the prepared data cached."""
    _, deps = stage_scripts()["prepare"]
    for module in ("edc/models/inference.py", "edc/optim.py", "edc/synth_views.py", "edc/data/augment.py"):
        assert not any(module == d or module.startswith(d.rstrip("/") + "/") for d in deps), module


def test_each_stage_declares_its_params_once():
    """dvc.yaml's `params:` of every stage is edc.stage.STAGE_PARAMS, which the stage logs to MLflow
    and fingerprints its checkpoints with: the three cannot disagree."""
    from edc.params import load_params
    from edc.stage import STAGE_PARAMS, stage_params

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_PARAMS)
    for name, st in stages.items():
        assert tuple(st["params"]) == STAGE_PARAMS[name], name
    p = load_params(ROOT / "params.yaml")
    got = stage_params(p, "post_evaluate")
    assert got["relabel"] == {"batch_size": p.relabel.batch_size, "epochs": p.relabel.epochs,
                              "min_steps": p.relabel.min_steps}
    assert got["evaluate"] == p.evaluate.model_dump() and got["zeta"] == p.zeta
    assert stage_params(p, "collect_stats")["synth"] == {"aug": p.synth.aug.model_dump()}
    for script in ROOT.glob("stages/*.py"):  # every stage logs and fingerprints through it
        text = script.read_text()
        assert f'stage_params(p, "{script.stem}")' in text, script.name


def test_the_data_package_imports_run_one_way():
    """edc/data: prepared.py (the format) imports nothing else of the package, and the package's
    imports (function-level ones included) have no cycle."""
    from edc.codedeps import imported_modules

    files = sorted((ROOT / "edc" / "data").glob("*.py"))
    graph = {f"edc.data.{f.stem}": {m for m in imported_modules(f) if m.startswith("edc.data.")} for f in files
             if f.stem != "__init__"}
    assert graph["edc.data.prepared"] == set()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        assert state.get(m) != 1, f"import cycle: {' -> '.join(path + [m])}"
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in graph.get(m, ()):
            visit(n, path + [m])
        state[m] = 2

    for m in graph:
        visit(m, [])


def test_a_stage_script_runs_the_edc_next_to_it(tmp_path):
    """A DVC experiment runs in a copy of the workspace; its stages must run the copy's edc (the one
    dvc.yaml hashed), not whatever an editable install points at."""
    import shutil
    import sys

    for item in ("edc", "stages"):
        shutil.copytree(ROOT / item, tmp_path / item, ignore=shutil.ignore_patterns("__pycache__"))
    stage = tmp_path / "edc" / "stage.py"
    stage.write_text(stage.read_text().replace('description=(doc or "").strip().splitlines()[0])',
                                               'description="the copy\'s edc")'))
    r = run([sys.executable, str(tmp_path / "stages" / "prepare.py"), "--help"], cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "the copy's edc" in r.stdout, r.stdout + r.stderr
