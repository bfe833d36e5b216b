"""A team's set-up, tested for real (docs/team.md): a throwaway
PostgreSQL cluster on 127.0.0.1 is the backend store of `python -m mlsys server`; the micro
pipeline logs to that server; its DVC outputs are pushed to a shared-directory remote; a
`git clone` elsewhere pulls them and `dvc repro` there runs nothing."""
from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from micro import MICRO, STAGES, env_for, free_port, http_json, make_repo, mlflow_service, run

pytestmark = pytest.mark.slow  # end-to-end runs of the micro pipeline (`pytest -m 'not slow'` skips them)


def postgres_bin() -> Path:
    """The folder of PostgreSQL's initdb and pg_ctl (Debian's newest /usr/lib/postgresql/N/bin,
    else from PATH), installing Debian's `postgresql` if missing (as root with apt-get); else skip."""
    def find() -> Path | None:
        debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True,
                        key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
        on_path = [Path(p).resolve().parent for p in [shutil.which("initdb")] if p]
        return next((d for d in [*debian, *on_path] if all((d / n).is_file() for n in ("initdb", "pg_ctl", "createdb"))),
                    None)

    if find() is None and os.geteuid() == 0 and shutil.which("apt-get"):
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]):
            subprocess.run(cmd, capture_output=True, timeout=900, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if find() is None:
        pytest.skip("PostgreSQL is not installed and cannot be installed here (needs root and apt-get: "
                    "`apt-get install -y postgresql`)")
    return find()


@contextlib.contextmanager
def postgres(bin_dir: Path) -> Iterator[str]:
    """A throwaway PostgreSQL cluster listening on 127.0.0.1:<free port> (its unix socket in
    its own folder) with a database `mlflow` of the superuser `mlsys` (trust authentication);
    yield its SQLAlchemy URI; always stop and delete it.

    initdb refuses to run as root: as root the server runs as the `postgres` user in a
    folder under /tmp made for it (pytest's folders may not be traversable by that user)."""
    base = Path(tempfile.mkdtemp(prefix="mlsys-pg-", dir="/tmp"))  # short: unix socket paths are limited
    data, log, port = base / "data", base / "server.log", free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")  # made by Debian's package
        except KeyError:
            user = pwd.getpwnam("nobody")
        os.chown(base, user.pw_uid, user.pw_gid)
        # runuser sits in /usr/sbin, which a non-login PATH may lack
        runuser = shutil.which("runuser") or next(
            (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.path.exists(p)), "runuser")
        as_user = [runuser, "-u", user.pw_name, "--"]

    def pg(*cmd: str, server: bool = True) -> None:
        proc = subprocess.run([*(as_user if server else []), str(bin_dir / cmd[0]), *cmd[1:]], cwd=base,
                              capture_output=True, text=True, timeout=120)
        if proc.returncode:
            server_log = log.read_text()[-2000:] if log.exists() else ""
            raise AssertionError(f"{cmd[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}\n{server_log}")

    try:
        pg("initdb", "-D", str(data), "-U", "mlsys", "--auth=trust", "-E", "UTF8", "--no-sync")
        pg("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-o", f"-h 127.0.0.1 -p {port} -k {base}", "start")
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "mlsys", "mlflow", server=False)
        yield f"postgresql://mlsys@127.0.0.1:{port}/mlflow"
    finally:
        for mode in ("fast", "immediate"):  # immediate: no clean shutdown, but surely stopped
            if not (data / "postmaster.pid").exists():
                break
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                pg("pg_ctl", "-D", str(data), "-m", mode, "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


def sql(uri: str, query: str) -> list[tuple]:
    """The rows of ``query`` read straight from PostgreSQL (not through MLflow)."""
    import psycopg

    with psycopg.connect(uri) as conn:
        return conn.execute(query).fetchall()


def server_runs(url: str) -> list[dict]:
    exp = http_json(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=mlsys")["experiment"]
    return http_json(f"{url}/api/2.0/mlflow/runs/search",
                     {"experiment_ids": [exp["experiment_id"]], "max_results": 1000})["runs"]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_team_set_up(tmp_path, capsys):
    bin_dir = postgres_bin()
    (tmp_path / "repo").mkdir()
    repo = make_repo(tmp_path / "repo", MICRO)
    artifacts, remote, other = tmp_path / "server-artifacts", tmp_path / "shared-dvc", tmp_path / "other"
    with postgres(bin_dir) as db, mlflow_service(repo, "server", "--backend-store-uri", db,
                                                 "--artifacts-destination", str(artifacts)) as url:
        # one researcher runs the whole pipeline, logging to the team's server
        start = time.monotonic()
        run(repo, "dvc", "repro", env=env_for(repo, MLFLOW_TRACKING_URI=url))
        with capsys.disabled():
            print(f"\nmicro `dvc repro` logging to MLflow on PostgreSQL: {time.monotonic() - start:.0f} s")

        runs = server_runs(url)
        parents = [r for r in runs if r["info"]["run_name"].startswith("pipeline ")]
        stages = [r for r in runs if r not in parents]
        assert len(parents) == 1 and sorted(r["info"]["run_name"] for r in stages) == sorted(STAGES)
        assert all(r["info"]["status"] == "FINISHED" for r in runs)
        assert all({t["key"]: t["value"] for t in r["data"]["tags"]}["mlflow.parentRunId"]
                   == parents[0]["info"]["run_id"] for r in stages)
        assert list(artifacts.rglob("loss_curves.png")), "artifacts are stored by the server"
        # the rows really are in PostgreSQL
        rows = sql(db, "SELECT r.name, r.status FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id"
                       " WHERE e.name = 'mlsys'")
        assert sorted(rows) == sorted((r["info"]["run_name"], "FINISHED") for r in runs)
        assert sql(db, "SELECT count(*) FROM metrics")[0][0] > 0

        # ... commits dvc.lock (and the small outputs git keeps) and pushes the data to the shared remote
        run(repo, "dvc", "remote", "add", "-d", "shared", str(remote))
        run(repo, "git", "add", "-A")
        run(repo, "git", "commit", "-qm", "pipeline outputs; shared DVC remote")
        run(repo, "dvc", "push")
        assert any(p.is_file() for p in remote.rglob("*")), "the remote holds the outputs"

        # another machine: a git clone gets the remote's address, pulls, and reproduces nothing
        run(tmp_path, "git", "clone", "-q", str(repo), str(other))
        assert 'remote = shared' in (other / ".dvc" / "config").read_text()
        assert not (other / "models" / "model1.pt").exists()
        run(other, "dvc", "pull")
        for name in ("data/clean.h5", "data/seed0/method2.h5", "models/seed0/model1.pt", "models/seed0/model4.pt"):
            assert md5(other / name) == md5(repo / name), name
        status = run(other, "dvc", "status")
        assert "Data and pipelines are up to date." in status.stdout, status.stdout
        repro = run(other, "dvc", "repro", env=env_for(other, MLFLOW_TRACKING_URI=url))
        out = repro.stdout + repro.stderr
        assert "Running stage" not in out and out.count("didn't change, skipping") == len(STAGES), out
        assert len(server_runs(url)) == len(runs), "no stage ran, so no run was logged"
