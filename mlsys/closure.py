"""The code a stage executes: a module's import closure inside mlsys, read from the source
(imports inside functions included, since they run when the stage does). dvc.yaml's code
deps of each stage are exactly this closure (tests/test_layout.py), and the same closure
stamps the resume fingerprints of chunked work (:func:`digest`), so the two can never
disagree: an edit to any file a stage executes re-runs it and discards its partial chunks,
and an edit anywhere else does neither."""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def imported(source: str, filename: str = "<source>") -> set[str]:
    """Names of the mlsys modules that ``source`` imports anywhere (also inside functions):
    ``from . import x``, ``from .x import y``, ``import mlsys.x``, ``from mlsys import x``,
    ``from mlsys.x import y``. Only modules that are files of the package count (the
    compiled ``_C`` is not)."""
    found = set()
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.ImportFrom):
            relative = node.level == 1
            if relative or (node.level == 0 and node.module == "mlsys"):
                if relative and node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(a.name for a in node.names)
            elif node.level == 0 and (node.module or "").startswith("mlsys."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("mlsys."))
    return {m for m in found if (PACKAGE / f"{m}.py").is_file()}


@lru_cache(maxsize=None)
def modules(module: str) -> tuple[str, ...]:
    """The sorted names of the mlsys modules that running ``module`` ("mlsys.train" or
    "train") executes: itself, the package's ``__init__`` and everything they import,
    transitively."""
    todo, seen = [module.removeprefix("mlsys."), "__init__"], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(imported((PACKAGE / f"{m}.py").read_text(), f"mlsys/{m}.py") - seen)
    return tuple(sorted(seen))


def files(module: str) -> list[str]:
    """:func:`modules` as repository paths (``mlsys/<name>.py``): a stage's code deps."""
    return [f"mlsys/{m}.py" for m in modules(module)]


def digest(module: str) -> str:
    """sha256 over the closure's file names and bytes: part of a chunk fingerprint, so
    chunks computed by other code are never merged with new ones."""
    h = hashlib.sha256()
    for m in modules(module):
        h.update(f"{m}\0".encode())
        h.update((PACKAGE / f"{m}.py").read_bytes())
    return h.hexdigest()
