"""The one place that talks to MLflow: tracking URI, pipeline parent runs, stage runs.

Conventions (docs/workflows.md, "What every run records"):
- The tracking URI is always explicit and absolute: ``MLFLOW_TRACKING_URI`` if set,
  else a SQLite file ``mlflow.db`` at the repository root.
- One parent run per pipeline invocation (``pipeline <date time>``), one child run per
  executed stage, named after the DVC stage (:func:`mlsys.paths.stage_name`:
  ``train-model1@0``, ``prepare``). Stages of one ``dvc repro`` find their parent
  through the DVC process they run under (or ``MLSYS_PARENT_RUN_ID``).
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
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import mlflow  # noqa: E402

from . import hardware  # noqa: E402
from .files import file_md5  # noqa: E402
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
    """The URI without user:password and without secret-looking query values, for logging."""
    uri = re.sub(r"//[^/?#]*@", "//", uri)
    return re.sub(r"(?i)([?&;][^=&;#]*(?:pass|secret|token|key|credential)[^=&;#]*=)[^&;#]*", r"\1***", uri)


def probe(uri: str, timeout: float = 5.0) -> None:
    """Raise ConnectionError naming ``uri`` (redacted) unless an http(s) tracking server
    accepts a connection within ``timeout`` seconds. MLflow itself retries an
    unreachable server for minutes before it gives up."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    local = parts.hostname in ("localhost", "127.0.0.1", "::1")
    if not local and getproxies().get(parts.scheme) and not proxy_bypass(parts.hostname or ""):
        return  # reached through a proxy: only MLflow's own requests can tell
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
    except (OSError, ValueError) as err:
        raise ConnectionError(f"MLflow tracking server {redact(uri)} is unreachable "
                              f"({err.strerror or err if isinstance(err, OSError) else err}); "
                              "start it or set MLFLOW_TRACKING_URI to a reachable server") from None


def setup(experiment: str = "mlsys") -> str:
    """Point MLflow at the project store and experiment; returns the experiment id."""
    for noisy in ("mlflow.store.db.utils", "mlflow.tracking.fluent", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # store creation chatter
    mlflow.set_tracking_uri(tracking_uri())
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", experiment)
    probe(tracking_uri(), float(os.environ.get("MLSYS_TRACKING_TIMEOUT", "5")))
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


def process_age() -> float | None:
    """Seconds since this process started (Linux /proc: its start tick against the uptime),
    None where that cannot be read."""
    info = _proc_stat(os.getpid())
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(info[1]) / os.sysconf("SC_CLK_TCK")) if info else None
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def timed(part: str) -> Iterator[None]:
    """Log the wall time of the block as metric ``timing/<part>_s`` of the active run (where a
    stage's time goes: ``timing/startup_s`` is logged by :func:`stage_run`; benchmarks/repro.py
    adds them up over a whole `dvc repro`)."""
    t0 = time.perf_counter()
    yield
    if mlflow.active_run() is not None:  # a shard or a rank other than 0 logs nothing
        mlflow.log_metric(f"timing/{part}_s", time.perf_counter() - t0)


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
        if _is_dvc(pid):  # one DVC queue worker runs several experiments: their names tell them apart
            where = f"{repo_root()}:{os.environ.get('DVC_EXP_NAME', '')}"
            return f"{pid}-{info[1]}-{hashlib.sha1(where.encode()).hexdigest()[:8]}"
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


def run_tags() -> dict[str, str]:
    """Tags of every run: git commit, DVC experiment, the tracking URI without
    credentials and the host (for `mlsys runs sweep`)."""
    return {**git_info(repo_root()), "dvc.experiment": os.environ.get("DVC_EXP_NAME", "workspace"),
            "mlsys.tracking_uri": redact(tracking_uri()), "mlsys.host": socket.gethostname(),
            "mlsys.machine": hardware.machine()}


STORE_MODULES = ("mlflow", "sqlalchemy", "alembic", "sqlite3")  # code that writes to a tracking store


def _inside(frame, packages: tuple[str, ...]) -> bool:
    """Whether ``frame`` or a caller of it runs code of one of ``packages``."""
    while frame is not None:
        if frame.f_globals.get("__name__", "").partition(".")[0] in packages:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, object], experiment: str = "mlsys",
              tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open the MLflow run of one executed DVC stage, as a child of the pipeline run.

    The run ends FINISHED on success, FAILED on an exception and KILLED on
    SIGINT/SIGTERM; the parent follows (RUNNING while a stage runs)."""
    experiment_id = setup(experiment)
    client = MlflowClient()
    common = run_tags()
    parent = _parent_run(client, experiment_id, common)
    if parent:
        client.update_run(parent, status="RUNNING")
    # SIGINT stays ignored where it was (a stage started in the background by a script)
    caught = [signal.SIGTERM] + [signal.SIGINT] * (signal.getsignal(signal.SIGINT) != signal.SIG_IGN)
    previous = {sig: signal.getsignal(sig) for sig in (*caught, signal.SIGALRM)}
    pending: list[int] = []

    def on_signal(signum, frame):  # SIGTERM and SIGINT become exceptions, so the run is closed
        if signum != signal.SIGALRM:
            pending.append(signum)
        if not pending:
            return
        if _inside(frame, STORE_MODULES):
            # not in the middle of a store write: its SQLite transaction would stay open,
            # the database locked, and the run could not be closed KILLED; look again soon
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            return
        signal.setitimer(signal.ITIMER_REAL, 0)
        if pending[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise StageKilled(f"stage {stage} received signal {pending[0]}")

    status = "FAILED"
    # pid + start time: `mlsys runs sweep` tells a crashed stage's run from a running one
    me = {"mlsys.pid": str(os.getpid()), "mlsys.pid_start": (_proc_stat(os.getpid()) or (0, ""))[1]}
    run = mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent,
                           tags={**common, **me, **(tags or {}), "dvc.stage": stage, "mlsys.kind": "stage"})
    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        startup = process_age()  # interpreter, imports, MLflow set-up: before the stage's own work
        mlflow.log_params({k: str(v) for k, v in params.items()})
        if startup is not None:
            mlflow.log_metric("timing/startup_s", startup)
        yield run
        status = "FINISHED"
    except (KeyboardInterrupt, StageKilled):
        status = "KILLED"
        raise
    finally:
        # a second signal must not cut the closing of the runs short
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            mlflow.end_run(status)
            if parent:
                client.set_terminated(parent, status)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _process_gone(tags: dict[str, str], pid_key: str, start_key: str | None) -> bool | None:
    """Whether the process that ran a run is gone: True/False on its own host, None
    where that cannot be told (another host, no pid recorded)."""
    pid = tags.get(pid_key, "")
    if tags.get("mlsys.host") != socket.gethostname() or not pid.isdigit():
        return None
    info = _proc_stat(int(pid))
    return info is None or bool(start_key and tags.get(start_key) and info[1] != tags[start_key])


def sweep(experiment: str = "mlsys", older_than_hours: float = 24.0,
          dry_run: bool = False) -> list[tuple[object, str]]:
    """Mark runs left RUNNING by a crash (SIGKILL, power loss) as FAILED.

    A stage run is swept when the process that ran it is gone (its host is this one
    and the recorded pid is dead or belongs to another process), or, where that cannot
    be checked (another host, no pid recorded), when it started more than
    ``older_than_hours`` ago. A pipeline run is swept when none of its stages is left
    running and its ``dvc`` process is gone (or, unknown, it is that old).
    Returns [(run, reason)] of the swept runs; ``dry_run`` changes nothing."""
    exp_id = setup(experiment)
    client = MlflowClient()
    running = client.search_runs([exp_id], "attributes.status = 'RUNNING'", max_results=50_000)
    now_h = time.time() / 3600

    def too_old(run) -> bool:
        return now_h - run.info.start_time / 3.6e6 > older_than_hours

    swept: list[tuple[object, str]] = []
    stages = [r for r in running if r.data.tags.get("mlsys.kind") != "pipeline"]
    pipelines = [r for r in running if r.data.tags.get("mlsys.kind") == "pipeline"]
    for run in stages:
        gone = _process_gone(run.data.tags, "mlsys.pid", "mlsys.pid_start")
        if gone:
            swept.append((run, f"process {run.data.tags['mlsys.pid']} on {socket.gethostname()} is gone"))
        elif gone is None and too_old(run):
            swept.append((run, f"RUNNING for more than {older_than_hours:g} h"))
    swept_ids = {r.info.run_id for r, _ in swept}
    busy = {r.data.tags.get("mlflow.parentRunId") for r in stages if r.info.run_id not in swept_ids}
    for run in pipelines:
        if run.info.run_id in busy:
            continue
        # mlsys.invocation = "<dvc pid>-<its start time>-<repo hash>"
        pid, _, rest = run.data.tags.get("mlsys.invocation", "").partition("-")
        gone = _process_gone({**run.data.tags, "pid": pid, "start": rest.rpartition("-")[0]}, "pid", "start")
        if gone:
            swept.append((run, f"no stage is running and its dvc process {pid} is gone"))
        elif gone is None and too_old(run):
            swept.append((run, f"no stage is running, RUNNING for more than {older_than_hours:g} h"))
    if not dry_run:
        for run, reason in swept:
            client.set_tag(run.info.run_id, "mlsys.swept", reason)
            client.set_terminated(run.info.run_id, "FAILED")
    return swept


def log_dataset(path: str | os.PathLike, context: str) -> str:
    """Record a DVC-tracked data file as an MLflow dataset input (name, digest, source);
    returns its md5, computed from the file itself as DVC does (never read from dvc.lock,
    which describes the previous run while a stage runs)."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    path = Path(path)
    digest = file_md5(path)
    with warnings.catch_warnings():  # MLflow registers the local-file source twice and says so
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(path.resolve()))
    ds = MetaDataset(source=source, name=path.name, digest=digest[:36])
    mlflow.log_input(ds, context=context, tags={"dvc.md5": digest})
    return digest


def log_model(model, example):
    """Log the U-Net as an MLflow model of the active run, a torch.export program (no pickle);
    ``example``, images (N >= 2, 3, H, W), gives the input example. The signature leaves the
    batch, height and width free (-1), so MLflow exports those dimensions as dynamic: the
    registered model takes any image size the U-Net takes (sides divisible by 2**depth), not
    just the example's. Returns its ModelInfo."""
    import torch
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    x = example.numpy()
    with torch.no_grad():
        y = model(example).numpy()
    free = lambda a: Schema([TensorSpec(a.dtype, (-1, a.shape[1], -1, -1))])  # noqa: E731
    return mlflow.pytorch.log_model(model, name="model", signature=ModelSignature(free(x), free(y)),
                                    input_example=x, serialization_format="pt2", pip_requirements=["torch"])


REGISTERED_MODEL = "mlsys-unet"
CHAMPION_ALIAS = "champion"


def register_champion(model: str, weights: str | os.PathLike, log_model, tags: dict[str, str],
                      name: str = REGISTERED_MODEL, alias: str = CHAMPION_ALIAS):
    """Register the MLflow model of ``model`` whose weights are the DVC-tracked file
    ``weights`` as a new version of ``name`` and point ``alias`` at it.

    The train stage tags its run ``mlsys.weights_md5``; the logged model of the latest
    finished train run with the file's md5 is registered. Where the store has none (the
    training was restored from the DVC cache into another store), ``log_model()`` logs
    the weights in the active run and returns its ModelInfo. Returns the ModelVersion."""
    client = MlflowClient()
    md5 = file_md5(weights)
    exp = mlflow.active_run().info.experiment_id
    source = None
    runs = client.search_runs([exp], f"tags.`mlsys.weights_md5` = '{md5}' and attributes.status = 'FINISHED'"
                              f" and tags.`mlsys.model` = '{model}'", order_by=["attributes.start_time DESC"])
    for run in runs:
        logged = client.search_logged_models([exp], filter_string=f"source_run_id = '{run.info.run_id}'")
        if logged:
            source = f"models:/{logged[0].model_id}"
            break
    if source is None:
        source = log_model().model_uri
    version = mlflow.register_model(source, name, tags={**tags, "mlsys.model": model, "mlsys.weights_md5": md5})
    client.update_registered_model(name, description=(
        "U-Net segmenting histology patches into 6 classes (background, neoplastic, inflammatory, "
        f"connective, dead, epithelial). The alias '{alias}' marks the best of the four models of the "
        "latest pipeline run that reached the report stage; see the version's tags for the criterion."))
    client.set_registered_model_alias(name, alias, version.version)
    return version
