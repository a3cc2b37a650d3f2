"""The code a stage runs: the import closure of its script within the ``edc`` package.

DVC reruns a stage when one of its ``deps:`` changes, so every module that can shape a stage's
outputs must be listed there. This module computes that set from the source (``ast``, no import
is executed), following ``import edc.x``, ``from edc.x import y``, relative imports and imports
inside functions (not those under ``if TYPE_CHECKING:``, which never run), and counting each
package's ``__init__.py``. Two users:

- ``tests/test_dvc_deps.py`` checks dvc.yaml's ``deps:`` against each stage's closure, so the list
  cannot drift when a module gains an import;
- :func:`edc.resume.fingerprint` includes :func:`package_digest` (the script and every module of the
  package: no parsing, which the closure would add to every stage's start-up),
  so a resume checkpoint made by other code is discarded.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = "edc"
ROOT = Path(__file__).resolve().parent.parent


def _module_file(name: str, root: Path) -> Path | None:
    base = root / Path(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _module_name(path: Path, root: Path) -> str:
    rel = path.resolve().relative_to(root).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """``edc`` modules named by the imports of ``path`` (and their parent packages)."""
    tree = ast.parse(Path(path).read_text(), filename=str(path))
    try:
        here = _module_name(Path(path), root)
        is_pkg = Path(path).name == "__init__.py"
    except ValueError:  # a script outside the tree: only absolute imports count
        here, is_pkg = "", False
    # imports under `if TYPE_CHECKING:` never run (annotations only): they shape no output
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
                   for child in node.body for n in ast.walk(child)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = here.split(".") if is_pkg else here.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                mod = ".".join(pkg + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            # `from edc.data import prepared` imports the module edc.data.prepared
            names.update(f"{mod}.{a.name}" for a in node.names if _module_file(f"{mod}.{a.name}", root))
    out: set[str] = set()
    for n in names:
        parts = n.split(".")
        if parts[0] != PACKAGE:
            continue
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {n for n in out if _module_file(n, root)}


def closure(script: str | Path, root: Path = ROOT) -> list[Path]:
    """Files of every ``edc`` module ``script`` imports, directly or not, relative to ``root``, sorted."""
    seen: set[str] = set()
    todo = [Path(script) if Path(script).is_absolute() else root / script]
    files: set[Path] = set()
    while todo:
        for mod in imported_modules(todo.pop(), root):
            if mod not in seen:
                seen.add(mod)
                f = _module_file(mod, root)
                files.add(f.relative_to(root))
                todo.append(f)
    return sorted(files)


def package_digest(script: str | Path, root: Path = ROOT) -> str:
    """sha256 over the bytes of ``script`` and of every module of the ``edc`` package: changes whenever
    the stage's code does (and when any other module does: a superset of the script's :func:`closure`,
    which a resume checkpoint can afford, read without parsing anything)."""
    script = Path(script) if Path(script).is_absolute() else root / script
    h = hashlib.sha256()
    for f in [script, *sorted((root / PACKAGE).rglob("*.py"))]:
        data = f.read_bytes()
        h.update(f"{f.relative_to(root) if f.is_relative_to(root) else f.name}:{len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()


def uncovered(script: str | Path, deps: list[str], root: Path = ROOT) -> list[str]:
    """The files of ``script`` and its closure that no entry of ``deps`` (a file or a folder above it)
    covers, as paths relative to ``root``."""
    norm = [d.rstrip("/") for d in deps]
    script = Path(script)
    rel_script = script.resolve().relative_to(root) if script.is_absolute() else script
    missing = []
    for f in [rel_script, *closure(script, root)]:
        s = f.as_posix()
        if not any(s == d or s.startswith(d + "/") for d in norm):
            missing.append(s)
    return missing
