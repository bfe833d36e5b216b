"""Helpers of the end-to-end tests: a micro copy of the repository run with real DVC
and MLflow, and real MLflow servers on free local ports (always stopped).

The session fixture ``pipeline`` (conftest.py) runs `dvc repro` once per test
session; tests that change a repository work on a ``clone`` of it."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import yaml

ROOT = Path(__file__).resolve().parents[1]
MICRO = {
    "seeds": [0],
    "data": {"n_images": 27, "image_size": 16},
    "model": {"base": 4, "depth": 2},
    "train": {"epochs": 2, "batch_size": 6, "device": "cpu"},
    "evaluate": {"n_panel": 2, "attack": {"steps": 2}, "robust": {"radii": [2, 8], "steps": 2}},
    "augment": {"device": "cpu", "method1": {"steps": 1}, "method2": {"chunk": 200}},
    "adversarial": {"epochs": 1, "steps": 1},  # the baselines: tiny as the rest
}
from mlsys.params import EXPERIMENT, METHODS, MODELS  # noqa: E402
from mlsys.paths import stage_name  # noqa: E402


def stages(seeds=(0, 1)) -> set[str]:
    """The DVC stage (= MLflow run) names of a pipeline over ``seeds``."""
    return {"prepare", "report", *(stage_name(job, name, s) for s in seeds
                                   for job, names in (("train", EXPERIMENT), ("augment", METHODS),
                                                      ("evaluate", EXPERIMENT))
                                   for name in names)}


STAGES = stages(MICRO["seeds"])   # of a repository made from MICRO
PIPELINE_SEEDS = [0, 1]            # the session's `pipeline` fixture runs two seeds (aggregation over seeds)


def merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def make_repo(dest: Path, overrides: dict) -> Path:
    """A git + DVC repository at ``dest`` with this project's code, dvc.yaml and
    params.yaml updated by ``overrides``."""
    for name in ("mlsys", "csrc", "bin"):
        if (ROOT / name).exists():
            shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "setup.py", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, dest / name)
    (dest / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", dest / ".dvc" / "config")
    shutil.copy(ROOT / ".dvc" / ".gitignore", dest / ".dvc" / ".gitignore")
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env_for(dest))
    return dest


def clone(repo: Path, dest: Path) -> Path:
    """A copy of a repository (git, DVC cache and outputs) with an empty MLflow store."""
    shutil.copytree(repo, dest, symlinks=True,
                    ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "tmp", "__pycache__"))
    return dest


def env_for(repo: Path, **extra: str) -> dict:
    """The environment of a command in ``repo``: no MLflow/DVC settings of the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", DVC_NO_ANALYTICS="1",
               MLFLOW_DISABLE_TELEMETRY="true", MLSYS_PROGRESS="0", PYTHONPATH=str(repo),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               OMP_NUM_THREADS="1", MLSYS_PYTHON=sys.executable, **extra)
    return env


def run(repo: Path, *cmd: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=repo, env=env or env_for(repo), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def store(repo: Path) -> str:
    return f"sqlite:///{repo / 'mlflow.db'}"


def runs_of(repo: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store(repo))
    exp = client.get_experiment_by_name("mlsys")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 30) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def mlflow_service(repo: Path, *args: str, env: dict | None = None, timeout: float = 180) -> Iterator[str]:
    """Run ``python -m mlsys <args> --port <free>`` (the UI or the tracking server) in its
    own process group; yield its base URL once /health answers; always stop it."""
    port = free_port()
    log = open(repo.parent / f"mlflow-service-{port}.log", "w+")  # outside the repository
    proc = subprocess.Popen([sys.executable, "-m", "mlsys", *args, "--port", str(port)], cwd=repo,
                            env=env or env_for(repo), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise AssertionError(f"mlsys {' '.join(args)} did not start:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
