"""``edc restore [STAGE...]``: put the workspace back to what git HEAD and dvc.lock record after a failed stage.

Under ``dvc repro`` and ``dvc exp run`` DVC deletes a stage's outputs before running its command, so a
stage that fails leaves them deleted. ``dvc checkout`` brings back only the outputs in the DVC cache;
the metrics and plots this project keeps in git (``cache: false``) need git. A failed ``dvc exp run -S``
also leaves its values in params.yaml, and dvc.lock records the stages that ran before the failure
with those values. Restoring, in order:

1. params.yaml and dvc.lock from git HEAD, when they differ from it (unless ``keep_params``): the
   params keys that change are printed, so that an edit can be made again;
2. ``dvc checkout`` of the stages (all of them when step 1 changed dvc.lock: the stages that ran
   before the failure changed their outputs too);
3. each ``cache: false`` output that ``dvc status`` still reports changed, from git HEAD;
4. ``dvc status`` once more: up to date, or an error naming what is left.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from edc.errors import EdcError

PARAMS = "params.yaml"
LOCK = "dvc.lock"


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True)


def head_bytes(path: str) -> bytes | None:
    """``path`` as git HEAD holds it; None when HEAD has no such file."""
    r = _git("show", f"HEAD:./{path}")
    return r.stdout if r.returncode == 0 else None


def uncached_outs(dvc_yaml: dict, stage: str) -> list[str]:
    """The outputs, metrics and plots of ``stage`` that dvc.yaml marks ``cache: false``."""
    spec = dvc_yaml["stages"][stage]
    paths = []
    for section in ("outs", "metrics", "plots"):
        for entry in spec.get(section) or []:
            if isinstance(entry, dict):
                paths += [path for path, opts in entry.items() if (opts or {}).get("cache") is False]
    return paths


def flat(tree, prefix: str = "") -> dict:
    """``{"a.b": value}`` of a nested mapping; lists are values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def params_changes(committed: bytes, current: bytes) -> list[str]:
    """``key: current (committed: value)`` for each params key whose value differs."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    def load(text: bytes) -> dict | None:
        try:
            return flat(YAML(typ="safe").load(text) or {})
        except YAMLError:
            return None

    old, new = load(committed), load(current)
    if old is None or new is None:  # an unreadable params.yaml is put back whole: there is no key to name
        return []
    missing = object()
    return [f"{k}: {new.get(k, '(absent)')!r} (committed: {old.get(k, '(absent)')!r})"
            for k in sorted(old.keys() | new.keys()) if old.get(k, missing) != new.get(k, missing)]


def _put_back_committed(path: str) -> bool:
    """Write git HEAD's ``path`` over the workspace's when they differ; True when it did."""
    committed, here = head_bytes(path), Path(path)
    if committed is None or (here.exists() and here.read_bytes() == committed):
        return False
    if path == PARAMS:
        changes = params_changes(committed, here.read_bytes() if here.exists() else b"")
        print(f"{path}: put back as committed" + (" (it held " + "; ".join(changes) + ")" if changes else ""))
    else:
        print(f"{path}: put back as committed")
    here.write_bytes(committed)
    return True


def _dvc(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    from edc.report import dvc_command

    return subprocess.run([dvc_command(), *args], capture_output=capture, text=True)


def _status(stages: list[str]) -> dict:
    import json

    r = _dvc("status", "--json", *stages, capture=True)
    if r.returncode != 0:
        raise EdcError(f"edc restore: `dvc status` failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(r.stdout or "{}")


def _changed_outs(status: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for stage, entries in status.items():
        for entry in entries:
            if isinstance(entry, dict) and "changed outs" in entry:
                out.setdefault(stage, set()).update(entry["changed outs"])
    return out


def _restore_from_git(path: str) -> bool:
    """``path`` (file or directory) exactly as git HEAD holds it; False when HEAD does not hold it."""
    if not _git("ls-tree", "-r", "--name-only", "HEAD", "--", path).stdout.strip():
        return False
    p = Path(path)
    if p.is_dir():
        shutil.rmtree(p)  # files the failed run may have left beside the committed ones
    elif p.exists():
        p.unlink()
    r = _git("checkout", "HEAD", "--", path)
    if r.returncode != 0:
        raise EdcError(f"{path}: git checkout failed: {r.stderr.decode().strip()}")
    print(f"{path}: put back from git HEAD")
    return True


def check_restorable(stages: list[str]) -> dict:
    """dvc.yaml, after checking that there is something to restore from and that ``stages`` are its stages."""
    from edc.params import read_yaml

    if not Path("dvc.yaml").exists():
        raise EdcError("edc restore: no dvc.yaml here; run it in the project's root directory")
    if _git("rev-parse", "--verify", "-q", "HEAD").returncode != 0:
        raise EdcError("edc restore: no git HEAD (not a git repository, or nothing committed yet): there is no "
                       "committed version to restore")
    if not Path(LOCK).exists() and head_bytes(LOCK) is None:
        raise EdcError("edc restore: no dvc.lock, neither here nor in git HEAD: no stage has recorded outputs yet "
                       "(run `dvc repro` first)")
    dvc_yaml = read_yaml("dvc.yaml")
    known = list(dvc_yaml.get("stages") or {})
    for stage in stages:
        if stage not in known:
            raise EdcError(f"edc restore: unknown stage {stage!r} (dvc.yaml has: {', '.join(known)})")
    return dvc_yaml


def restore(stages: list[str], keep_params: bool = False) -> None:
    """Bring ``stages`` (all when empty) back to the outputs dvc.lock records, metrics and plots
    included; see the module docstring. Raises EdcError when something is left changed."""
    dvc_yaml = check_restorable(stages)
    if not keep_params:
        params_back = _put_back_committed(PARAMS)
        if _put_back_committed(LOCK) and stages:
            print("dvc.lock changed since the commit: restoring every stage")
            stages = []
        elif params_back and stages:
            stages = []  # each stage reading a restored key is checked, not just the one named
    if _dvc("checkout", *stages).returncode != 0:
        raise EdcError("edc restore: `dvc checkout` failed (see DVC's message above); `dvc pull` fetches outputs "
                       "missing from the cache")
    not_in_git = [path for stage, changed in _changed_outs(_status(stages)).items()
                  for path in uncached_outs(dvc_yaml, stage)
                  if path.rstrip("/") in {c.rstrip("/") for c in changed} and not _restore_from_git(path)]
    if not_in_git:
        raise EdcError(f"edc restore: {', '.join(not_in_git)}: not in git HEAD, so there is no recorded version to "
                       "restore; `dvc repro` remakes them (commit reports/ with dvc.lock after a run)")
    left = _status(stages)
    if _changed_outs(left):
        raise EdcError(f"edc restore: `dvc status` still reports changed outputs in {', '.join(_changed_outs(left))} "
                       "(run it to see which)")
    if left:
        print(f"dvc status: outputs as dvc.lock records; {', '.join(left)} would rerun on `dvc repro` (changed "
              "deps" + (": params.yaml keeps your edits" if keep_params else "") + ")")
    else:
        print("dvc status: up to date")
