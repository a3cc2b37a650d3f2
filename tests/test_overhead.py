"""The pipeline's own overhead (benchmarks/overhead.py). What a stage process loads before its work,
paid by every stage of every `dvc repro`: a stage that is off writes its placeholder outputs without
torch; no stage imports torchvision (and with it torch._dynamo) or MLflow on its way in. And what the
benchmark counts as compute: an evaluation pass, once."""

from __future__ import annotations

import json
import os
import sys

import pytest

from edc.io import md5_file
from edc.params import read_yaml
from tests.helpers import ARGS, ROOT, run, write_yaml

OPTIONAL = {"reference": "reference.enabled", "continual": "continual.enabled", "slimming": "slimming.enabled"}
# Loaded later, or only where used: MLflow on the stage's tracking thread (edc.tracking), torchvision
# by RandAugment and torchvision's own architectures when a params key asks for them.
NOT_AT_START = ("torchvision", "torch._dynamo", "mlflow")


def _params(tmp_path, enabled: bool):
    raw = read_yaml(ROOT / "params.yaml")
    for key in OPTIONAL.values():
        raw[key.split(".")[0]]["enabled"] = enabled
    return write_yaml(tmp_path / "params.yaml", raw)


def _run_script(name: str, cwd, code_after: str, **env: str) -> dict:
    """Stage script ``name`` run as DVC runs it (``__main__``, dvc.yaml's arguments) in ``cwd``; then
    ``code_after`` in the same process (``code``: the stage's exit code), whose printed JSON is returned;
    ``env`` adds variables."""
    code = ("import json, runpy, sys\n"
            f"sys.argv = [{str(ROOT / 'stages' / f'{name}.py')!r}, '--params', 'params.yaml', *{ARGS[name]!r}]\n"
            "try:\n"
            "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "    code = 0\n"
            "except SystemExit as exc:\n"
            "    code = exc.code\n"
            f"{code_after}")
    r = run([sys.executable, "-c", code], cwd=cwd, env={"PYTHONPATH": str(ROOT), **env}, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(OPTIONAL))
def test_a_stage_that_is_off_writes_the_recorded_bytes_without_torch(name, tmp_path):
    """Off (the default), the stage's outputs are the bytes dvc.lock records for them, and its process
    never imports torch, MLflow or the method: its cost is Python's start and reading params.yaml."""
    _params(tmp_path, enabled=False)
    got = _run_script(name, tmp_path, "print(json.dumps({'exit': code, 'loaded': sorted(m for m in sys.modules if "
                                      "m.split('.')[0] in ('torch', 'torchvision', 'mlflow', 'numpy'))}))")
    assert got == {"exit": 0, "loaded": []}
    lock = read_yaml(ROOT / "dvc.lock")["stages"][name]["outs"]
    assert read_yaml(ROOT / "params.yaml")[name]["enabled"] is False  # the lock records the stage off
    assert {o["path"]: md5_file(tmp_path / o["path"]) for o in lock} == {o["path"]: o["md5"] for o in lock}


@pytest.mark.parametrize("name", sorted(OPTIONAL))
def test_a_stage_that_is_on_takes_its_share_of_the_cores(name, tmp_path):
    """stage_main leaves the thread count to an optional stage's main (threads=False): on, the stage
    sets it before its work, as every other stage's process has it (tests/test_throughput.py). No
    inputs here: the stage fails after setting it, at its first read."""
    _params(tmp_path, enabled=True)
    want = len(os.sched_getaffinity(0)) + 1  # neither torch's default nor what the test process has
    got = _run_script(name, tmp_path, "import torch\nprint(json.dumps({'exit': code, 'threads': "
                                      "[torch.get_num_threads(), torch.get_num_interop_threads()]}))",
                      EDC_THREADS=str(want))
    assert got["exit"] != 0 and got["threads"] == [want, 1]


def test_no_stage_imports_torchvision_dynamo_or_mlflow_on_its_way_in():
    """Importing each stage script (all its module-level imports, as its process does before main)
    loads none of NOT_AT_START: torchvision alone costs a stage about a second."""
    code = ("import json, runpy, sys\n"
            "seen, out = set(), {}\n"
            f"for name in {sorted(ARGS)!r}:\n"
            f"    runpy.run_path({str(ROOT / 'stages')!r} + f'/{{name}}.py', run_name='edc_test')\n"
            f"    new = {{m for m in sys.modules if m.startswith({NOT_AT_START!r})}} - seen\n"
            "    out[name] = sorted(m for m in new if '.' not in m or m in ('torch._dynamo',))\n"
            "    seen |= new\n"
            "print(json.dumps(out))\n")
    r = run([sys.executable, "-c", code], env={"PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {name: [] for name in sorted(ARGS)}


@pytest.mark.parametrize("section,key,value", [
    ("reference", "enabled", "yes"), ("reference", "enabeld", True), ("continual", "seeds", 0),
    ("slimming", "criteria", ["bn", "size"]), ("slimming", None, 5)])
def test_a_section_read_alone_reports_a_problem_as_the_whole_file_does(tmp_path, section, key, value):
    """load_section (what an optional stage reads first) names the same key with the same words as
    load_params; the section's defaults stand where the file leaves it out."""
    from edc.params import Params, ParamsError, load_params, load_section

    raw = read_yaml(ROOT / "params.yaml")
    if key is None:
        raw[section] = value
    else:
        raw[section][key] = value
    f = write_yaml(tmp_path / "params.yaml", raw)
    with pytest.raises(ParamsError) as whole:
        load_params(f)
    with pytest.raises(ParamsError) as alone:
        load_section(f, section)
    assert str(alone.value) == str(whole.value) and str(alone.value).startswith(f"{f}: {section}")
    del raw[section]
    default = Params.model_fields[section].default_factory()
    assert load_section(write_yaml(tmp_path / "without.yaml", raw), section) == default


def test_an_evaluation_pass_counts_as_compute_once(monkeypatch):
    """Under EDC_TIMING_FILE a test-split pass (accuracy) adds its time to the compute clock; inside a
    loop that reports progress (a validation point each epoch) the loop counts it, and it adds nothing."""
    import time

    import torch
    from torch import nn

    from edc import progress
    from edc.training import accuracy

    class Slow(nn.Module):
        def forward(self, x):
            time.sleep(0.05)
            return torch.zeros(len(x), 2)

    split = (torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.int64))
    monkeypatch.setenv("EDC_TIMING_FILE", "unused")
    monkeypatch.setitem(progress.clock, "loops", 0.0)
    assert accuracy(Slow(), split, batch_size=2) == 1.0
    alone = progress.clock["loops"]
    assert 0.1 <= alone < 1.0  # two batches of 0.05 s
    start = time.perf_counter()
    for _ in progress.progress(range(1)):
        accuracy(Slow(), split, batch_size=2)
    inside = time.perf_counter() - start
    assert alone + 0.1 <= progress.clock["loops"] <= alone + inside
