"""Files, the bottom layer: outputs written atomically (a killed stage never leaves a file
that looks complete), md5 as DVC records it, metrics JSON and plot CSV, and the check that a
stage's input exists."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from .params import InputError


class MissingInput(InputError, FileNotFoundError):
    """A stage's input does not exist; the message names the stage that makes it."""


def file_md5(path: str | os.PathLike) -> str:
    """md5 of a file's bytes (what DVC records for a file output)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | os.PathLike, obj) -> None:
    """A metrics file (DVC metrics, read by `dvc metrics/exp show`), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """A plot file (DVC plots) of ``rows`` with the keys of the first row, written atomically."""
    keys = list(rows[0])
    with atomic_path(path) as tmp:
        tmp.write_text(",".join(keys) + "\n" + "".join(
            ",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + "\n" for r in rows))


def require(path: str | os.PathLike, made_by: str) -> None:
    """An input of a stage must exist: else one line naming it and the stage that makes it."""
    if not Path(path).exists():
        raise MissingInput(f"{path} does not exist; it is made by the {made_by} stage "
                        f"(run `dvc repro {made_by}` or the whole `dvc repro`)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _clear_stale(path: Path) -> None:
    """Remove temporaries of ``path`` left by killed processes (``.name.tmp<pid>``)."""
    for tmp in path.parent.glob(f".{path.name}.tmp*"):
        pid = tmp.name[len(path.name) + 5:].removesuffix("old")
        if pid.isdigit() and not _pid_alive(int(pid)):
            _remove(tmp)


def _make_parents(path: Path) -> list[Path]:
    """Create the missing parent folders of ``path``; returns them, deepest first."""
    made = []
    for parent in path.parents:
        if parent.exists():
            break
        made.append(parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    return made


def _remove_empty(folders: list[Path]) -> None:
    """Remove folders made for an output that was not written, while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (another output landed there) or gone
            return


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success,
    delete it on failure, so a killed or failed stage leaves no plausible output.
    Temporaries of killed earlier runs (SIGKILL runs no cleanup) are removed first."""
    path = Path(path)
    made = _make_parents(path)
    _clear_stale(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
        if not path.exists():
            _remove_empty(made)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Like :func:`atomic_path` for an output folder (a DVC out dir written file by
    file): yields an empty temporary folder beside ``path`` that replaces ``path``
    only once everything in it is written."""
    path = Path(path)
    made = _make_parents(path)
    _clear_stale(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():  # a folder cannot be renamed over a non-empty one: move it aside
            old = path.with_name(f".{path.name}.tmp{os.getpid()}old")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            _remove(tmp)
        if not path.exists():
            _remove_empty(made)
