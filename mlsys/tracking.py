"""The one place that talks to MLflow: tracking URI, pipeline parent runs, stage runs.

Conventions (DESIGN.md, "The system"):
- The tracking URI is always explicit and absolute: ``MLFLOW_TRACKING_URI`` if set,
  else a SQLite file ``mlflow.db`` at the repository root.
- One parent run per pipeline invocation, one child run per executed stage, named
  after the DVC stage (``train@model1``). Stages of one ``dvc repro`` find their
  parent through the DVC process they run under (or ``MLSYS_PARENT_RUN_ID``).
- A stage that raises ends its run FAILED; SIGINT/SIGTERM end it KILLED. The parent
  is RUNNING only while one of its stages runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

PARENT_ENV = "MLSYS_PARENT_RUN_ID"


class StageKilled(BaseException):
    """Raised inside a stage when it receives SIGTERM (SIGINT raises KeyboardInterrupt)."""


def repo_root(start: Path | None = None) -> Path:
    """The project root: the nearest folder holding dvc.yaml. A DVC queued or
    temporary experiment runs in ``<root>/.dvc/tmp/exps/...``; its runs belong to
    the store of the real root."""
    here = (start or Path.cwd()).resolve()
    match = re.match(r"(.*?)/\.dvc/tmp/exps/", str(here) + "/")
    if match:
        return Path(match.group(1))
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").exists():
            return folder
    return here


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def redact(uri: str) -> str:
    """The URI without user:password, for logging."""
    return re.sub(r"//[^/@]+@", "//", uri)


def setup(experiment: str = "mlsys") -> str:
    """Point MLflow at the project store and experiment; returns the experiment id."""
    for noisy in ("mlflow.store.db.utils", "mlflow.tracking.fluent", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # store creation chatter
    mlflow.set_tracking_uri(tracking_uri())
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", experiment)
    try:
        if tracking_uri().startswith("sqlite:") and mlflow.get_experiment_by_name(name) is None:
            # artifacts beside the SQLite store, not in whatever folder the first stage ran in
            mlflow.create_experiment(name, artifact_location=(repo_root() / "mlartifacts").as_uri())
        exp = mlflow.set_experiment(name)
    except Exception as err:  # noqa: BLE001 - connection, permission or schema problems
        raise ConnectionError(f"MLflow tracking store {redact(tracking_uri())} is not usable: "
                              f"{str(err).splitlines()[0]}") from None
    return exp.experiment_id


def git_info(root: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock"))
    return {"git.commit": commit or "unknown", "git.dirty": str(dirty).lower(),
            "mlflow.source.git.commit": commit or "unknown"}


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a process, from /proc (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), fields[19]


def _is_dvc(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    names = [os.path.basename(a.decode(errors="replace")) for a in argv[:3]]
    return "dvc" in names or any(a == b"dvc" for a in argv[1:3])


def invocation_key() -> str | None:
    """Identity of the ``dvc`` process running this stage (pid + start time), if any."""
    pid = os.getppid()
    for _ in range(12):
        info = _proc_stat(pid)
        if info is None or pid <= 1:
            return None
        if _is_dvc(pid):
            return f"{pid}-{info[1]}-{hashlib.sha1(str(repo_root()).encode()).hexdigest()[:8]}"
        pid = info[0]
    return None


def _parent_run(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> str | None:
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    key = invocation_key()
    if key is None:
        return None
    found = client.search_runs([experiment_id], f"tags.`mlsys.invocation` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    name = f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}"
    if os.environ.get("DVC_EXP_NAME"):
        name += f" [{os.environ['DVC_EXP_NAME']}]"
    run = client.create_run(experiment_id, run_name=name,
                            tags={**tags, "mlsys.invocation": key, "mlsys.kind": "pipeline"})
    return run.info.run_id


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, object], experiment: str = "mlsys",
              tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open the MLflow run of one executed DVC stage, as a child of the pipeline run.

    The run ends FINISHED on success, FAILED on an exception and KILLED on
    SIGINT/SIGTERM; the parent follows (RUNNING while a stage runs)."""
    experiment_id = setup(experiment)
    root = repo_root()
    client = MlflowClient()
    common = {**git_info(root), "dvc.experiment": os.environ.get("DVC_EXP_NAME", "workspace"),
              "mlsys.tracking_uri": redact(tracking_uri())}
    parent = _parent_run(client, experiment_id, common)
    if parent:
        client.update_run(parent, status="RUNNING")
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):  # turn SIGTERM into an exception so the run is closed
        raise StageKilled(f"stage {stage} received signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    status = "FAILED"
    run = mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent,
                           tags={**common, **(tags or {}), "dvc.stage": stage, "mlsys.kind": "stage"})
    try:
        mlflow.log_params({k: str(v) for k, v in params.items()})
        yield run
        status = "FINISHED"
    except (KeyboardInterrupt, StageKilled):
        status = "KILLED"
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        mlflow.end_run(status)
        if parent:
            client.set_terminated(parent, status)


def dataset_digest(path: str | os.PathLike) -> str:
    """md5 of a data file as recorded in dvc.lock, else computed (DVC's md5)."""
    path = Path(path)
    lock = repo_root() / "dvc.lock"
    rel = os.path.relpath(path.resolve(), repo_root())
    if lock.exists():
        import yaml

        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage in stages.values():
            for out in stage.get("outs", []) or []:
                if out.get("path") == rel and out.get("md5") and out.get("size") == path.stat().st_size:
                    return out["md5"]
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def log_dataset(path: str | os.PathLike, context: str) -> None:
    """Record a DVC-tracked data file as an MLflow dataset input (name, digest, source)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    import warnings

    path = Path(path)
    digest = dataset_digest(path)
    with warnings.catch_warnings():  # MLflow registers the local-file source twice and says so
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(path.resolve()))
    ds = MetaDataset(source=source, name=path.name, digest=digest[:36])
    mlflow.log_input(ds, context=context, tags={"dvc.md5": digest})
