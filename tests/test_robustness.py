"""Nothing lost, nothing crashes: interruption, resume, determinism, run hygiene, secrets.

Real processes throughout: a micro copy of the repository, a real `dvc repro` killed
with SIGKILL in the middle of writing method two's dataset and run again, real
SIGTERM/SIGINT to a training stage, `mlsys runs sweep` on the runs a crash left
RUNNING, real MLflow (SQLite) and HDF5. The uninterrupted reference is the session's
micro pipeline (conftest.py ``pipeline``), built from the same params in another folder.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from micro import MICRO, env_for, make_repo, run, runs_of, store

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {"MLFLOW_TRACKING_PASSWORD": "pw-9f3b1c0e", "MLFLOW_TRACKING_TOKEN": "tok-77ad02b4",
           "AWS_SECRET_ACCESS_KEY": "aws-5e6f7a1d"}


# --------------------------------------------------------------------------- the interrupted pipeline
@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """`dvc repro augment-method2@0` killed (SIGKILL, whole process group) right after method
    two finished its first chunk of images; then `mlsys runs sweep`; then `dvc repro
    augment-method2@0` again. Returns what was seen at each point. Secrets sit in the
    environment of every command."""
    repo = make_repo(tmp_path_factory.mktemp("interrupted"), MICRO)
    env = env_for(repo, **SECRETS)
    partial = repo / "data/seed0/.method2.h5.partial"
    proc = subprocess.Popen(["dvc", "repro", "augment-method2@0"], cwd=repo, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not list(partial.glob("*.npz")):
        assert proc.poll() is None, f"dvc repro ended before method two wrote a chunk:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "method two never finished a chunk"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    seen = {"repo": repo, "chunks_done": sorted(p.name for p in partial.glob("*.npz")),
            "leftovers": sorted(p.name for p in (repo / "data").glob(".method2.h5.tmp*")),
            "final_exists": (repo / "data/seed0/method2.h5").exists(),
            "metrics_exists": (repo / "metrics/augment/seed0/method2.json").exists(),
            "status": subprocess.run(["dvc", "status", "augment-method2@0"], cwd=repo, env=env,
                                     capture_output=True, text=True).stdout}
    client, runs = runs_of(repo)
    seen["running"] = sorted(r.info.run_name for r in runs if r.info.status == "RUNNING")
    seen["dry"] = run(repo, sys.executable, "-m", "mlsys", "runs", "sweep", "--dry-run", env=env).stdout
    seen["sweep"] = run(repo, sys.executable, "-m", "mlsys", "runs", "sweep", env=env).stdout
    seen["after_sweep"] = sorted(r.info.status for r in runs_of(repo)[1])
    seen["rerun"] = run(repo, "dvc", "repro", "augment-method2@0", env=env).stdout
    seen["status_after"] = run(repo, "dvc", "status", "augment-method2@0", env=env).stdout
    return seen


@pytest.mark.slow
def test_sigkill_mid_stage_leaves_nothing_dvc_accepts_and_repro_completes(interrupted):
    seen, repo = interrupted, interrupted["repo"]
    # the HDF5 file is written (to a temporary, renamed when complete) once every chunk is done
    assert not seen["final_exists"] and not seen["metrics_exists"]
    assert "augment-method2@0" in seen["status"] and "deleted" in seen["status"]
    assert 1 <= len(seen["chunks_done"]) < 3, seen["chunks_done"]   # 18 images in chunks of 8
    # the second repro ran only the interrupted stage, and only the unfinished chunks
    assert "Running stage 'augment-method2@0'" in seen["rerun"]
    assert "Running stage 'prepare'" not in seen["rerun"] and "Running stage 'train-model1@0'" not in seen["rerun"]
    done = 8 * len(seen["chunks_done"])
    assert f"method2: resumed {done} of 18 images" in seen["rerun"]
    assert "Data and pipelines are up to date" in seen["status_after"]
    assert not list((repo / "data").glob(".method2.h5.*")), "temporaries and the partial folder are gone"
    from mlsys import data, prepare

    images, masks = data.load_split(repo / "data/seed0/method2.h5", "train")
    assert images.shape == (18, 3, 16, 16) and masks.shape == (18, 16, 16)


@pytest.mark.slow
def test_sweep_marks_the_killed_runs_failed(interrupted):
    seen = interrupted
    names = seen["running"]     # what the crash left RUNNING: the stage and its pipeline run
    assert len(names) == 2 and names[0] == "augment-method2@0" and names[1].startswith("pipeline "), names
    assert "would mark" in seen["dry"] and "2 run(s) left RUNNING by a crash (dry run)" in seen["dry"]
    lines = seen["sweep"].splitlines()
    assert lines[-1] == "2 run(s) left RUNNING by a crash"
    assert any("(augment-method2@0) FAILED: process" in line and "is gone" in line for line in lines)
    assert any("(pipeline " in line and "dvc process" in line for line in lines)
    assert seen["after_sweep"] == ["FAILED", "FAILED", "FINISHED", "FINISHED"], "nothing is left RUNNING"
    client, runs = runs_of(seen["repo"])
    killed = [r for r in runs if r.data.tags.get("mlsys.swept")]
    assert {r.info.status for r in killed} == {"FAILED"} and len(killed) == 2
    assert all(r.info.end_time for r in killed)


def test_sweep_spares_live_processes_and_uses_the_age_where_it_cannot_tell(tmp_path, monkeypatch):
    import socket

    import mlflow

    from mlsys import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.setup("sweep")
    client = mlflow.MlflowClient()
    me = {"mlsys.host": socket.gethostname(), "mlsys.pid": str(os.getpid()),
          "mlsys.pid_start": tracking._proc_stat(os.getpid())[1]}
    day_ago = int((time.time() - 30 * 3600) * 1000)
    made = {
        "live": client.create_run(exp, run_name="live", tags=me, start_time=day_ago),
        "reused pid": client.create_run(exp, run_name="reused pid", tags={**me, "mlsys.pid_start": "1"}),
        "elsewhere, old": client.create_run(exp, run_name="elsewhere, old", start_time=day_ago,
                                            tags={"mlsys.host": "other-host", "mlsys.pid": "1"}),
        "elsewhere, recent": client.create_run(exp, run_name="elsewhere, recent", tags={"mlsys.host": "other"}),
    }
    swept = {run.info.run_name: why for run, why in tracking.sweep("sweep", older_than_hours=24)}
    assert set(swept) == {"reused pid", "elsewhere, old"}, swept
    assert "RUNNING for more than 24 h" in swept["elsewhere, old"]
    status = {name: client.get_run(r.info.run_id).info.status for name, r in made.items()}
    assert status == {"live": "RUNNING", "reused pid": "FAILED", "elsewhere, old": "FAILED",
                      "elsewhere, recent": "RUNNING"}
    assert [r.info.run_name for r, _ in tracking.sweep("sweep", older_than_hours=0)] == ["elsewhere, recent"]


def h5_contents(path: Path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        out["attrs"] = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in f.attrs.items()}
    return out


def assert_same_h5(a: Path, b: Path) -> None:
    ca, cb = h5_contents(a), h5_contents(b)
    assert ca.keys() == cb.keys()
    for key in ca:
        if key == "attrs":
            assert ca[key] == cb[key]
        else:
            assert ca[key].dtype == cb[key].dtype and np.array_equal(ca[key], cb[key]), f"{a.name}:{key}"


@pytest.mark.slow
def test_resumed_and_fresh_runs_are_bit_identical(interrupted, pipeline):
    """Same params and seed in two folders, one killed and resumed: identical datasets,
    weights and metrics (CPU)."""
    repo, ref = interrupted["repo"], pipeline[0]
    for name in ("clean.h5", "seed0/method2.h5"):
        assert_same_h5(repo / "data" / name, ref / "data" / name)
        # nothing time-dependent is stored: the files are byte for byte the same
        assert (repo / "data" / name).read_bytes() == (ref / "data" / name).read_bytes(), name
    a = torch.load(repo / "models/seed0/model1.pt", weights_only=True)
    b = torch.load(ref / "models/seed0/model1.pt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for name in ("train/seed0/model1.json", "augment/seed0/method2.json"):
        ma, mb = (json.loads((r / "metrics" / name).read_text()) for r in (repo, ref))
        ma.pop("mlflow_run_id", None), mb.pop("mlflow_run_id", None)
        assert ma == mb, name
    assert (repo / "plots/train/seed0/model1.csv").read_text() == (ref / "plots/train/seed0/model1.csv").read_text()


@pytest.mark.slow
def test_no_secret_lands_in_params_tags_or_artifacts(interrupted):
    """The stages ran with credentials in their environment: none of them is in the
    MLflow store (params, tags, metrics), its artifacts or any file of the repository."""
    repo = interrupted["repo"]
    client, runs = runs_of(repo)
    assert runs
    for r in runs:
        values = [*r.data.params.values(), *r.data.tags.values(), r.info.run_name]
        assert not [v for v in values for s in SECRETS.values() if s in str(v)], r.info.run_name
    hits = [str(p) for p in repo.rglob("*") if p.is_file() and not p.is_relative_to(repo / ".git")
            and any(s.encode() in p.read_bytes() for s in SECRETS.values())]
    assert hits == []


# --------------------------------------------------------------------------- SIGTERM / SIGINT
def wait_for_run(repo: Path, name: str, proc: subprocess.Popen, also: Path) -> None:
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{name} did not start"
        if also.exists() and (repo / "mlflow.db").exists():
            _, runs = runs_of(repo)
            if any(r.info.run_name == name and r.info.status == "RUNNING" for r in runs):
                return
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("sig,code,said", [(signal.SIGTERM, 143, "received signal 15; stopped"),
                                           (signal.SIGINT, 130, "interrupted")], ids=["SIGTERM", "SIGINT"])
def test_signal_ends_stage_and_parent_killed(interrupted, sig, code, said):
    repo = interrupted["repo"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epochs"] = 100_000   # runs until the signal comes
    (repo.parent / "long.yaml").write_text(yaml.safe_dump(params))
    import mlflow

    client = mlflow.MlflowClient(store(repo))
    exp = client.get_experiment_by_name("mlsys").experiment_id
    parent = client.create_run(exp, run_name=f"pipeline {sig.name}", tags={"mlsys.kind": "pipeline"}).info.run_id
    client.set_terminated(parent, "FINISHED")
    checkpoint = repo / "checkpoints/seed0/model3.pt"
    checkpoint.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "mlsys", "--params", str(repo.parent / "long.yaml"), "train",
                             "model3"], cwd=repo, env=env_for(repo, MLSYS_PARENT_RUN_ID=parent),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a suite started in the background (`cmd &` in a script) inherits SIGINT
                            # ignored, and Python then ignores Ctrl-C: give the stage a terminal's SIGINT
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_run(repo, "train-model3@0", proc, checkpoint)   # an epoch is done: deep in the loop
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1].endswith(said) and "Traceback" not in err
    _, runs = runs_of(repo)
    stage = [r for r in runs if r.info.run_name == "train-model3@0" and r.data.tags.get("mlflow.parentRunId") == parent]
    assert [r.info.status for r in stage] == ["KILLED"]
    assert client.get_run(parent).info.status == "KILLED"
    assert not (repo / "models/seed0/model3.pt").exists() and not list((repo / "models").glob(".*tmp*"))
    assert checkpoint.exists(), "the last finished epoch is kept for resuming"


# --------------------------------------------------------------------------- atomic outputs
CHILD = """
import sys, time
from pathlib import Path
from mlsys.files import atomic_dir, atomic_path
dest = Path(sys.argv[1])
with atomic_dir(dest / "plots") as d, atomic_path(dest / "table.csv") as f:
    (d / "panel.png").write_text("new")
    f.write_text("new,half")
    print("writing", flush=True)
    time.sleep(120)
"""


def test_sigkill_inside_atomic_outputs_keeps_the_old_ones(tmp_path):
    from mlsys.files import atomic_dir, atomic_path

    (tmp_path / "plots").mkdir()
    (tmp_path / "plots/panel.png").write_text("old")
    (tmp_path / "table.csv").write_text("old")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait(timeout=30)
    proc.stdout.close()
    assert (tmp_path / "plots/panel.png").read_text() == "old" and (tmp_path / "table.csv").read_text() == "old"
    assert sorted(p.name for p in tmp_path.glob(".*")) == [f".plots.tmp{proc.pid}", f".table.csv.tmp{proc.pid}"]
    with atomic_dir(tmp_path / "plots") as d, atomic_path(tmp_path / "table.csv") as f:
        (d / "panel.png").write_text("newer")
        f.write_text("newer")
    assert (tmp_path / "plots/panel.png").read_text() == "newer" and (tmp_path / "table.csv").read_text() == "newer"
    assert not list(tmp_path.glob(".*")), "the killed process's temporaries are cleared"
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "plots") as d:
        (d / "panel.png").write_text("failed")
        raise RuntimeError
    assert (tmp_path / "plots/panel.png").read_text() == "newer" and not list(tmp_path.glob(".*"))


def test_figures_are_written_through_a_temporary(tmp_path):
    """figures.save never writes at the final path: a failing or killed save leaves nothing there."""
    import matplotlib.pyplot as plt

    from mlsys import figures

    final = tmp_path / "out/f.png"
    fig, _ = plt.subplots()
    written, savefig = [], fig.savefig

    def spy(path, **kw):
        written.append((Path(path).name, final.exists()))
        savefig(path, **kw)
        if len(written) == 2:
            raise OSError("disk full")

    fig.savefig = spy
    figures.save(fig, final)
    assert written[0][0].startswith(".f.png.tmp") and written[0][1] is False
    assert final.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in final.parent.iterdir()] == ["f.png"]
    final.unlink()
    with pytest.raises(OSError):
        figures.save(fig, final)
    assert list(final.parent.iterdir()) == []


# --------------------------------------------------------------------------- resume
def test_method1_resumes_from_its_last_chunk(tmp_path, capsys, one_thread):
    from mlsys import data, prepare
    from mlsys.augment import build_set
    from mlsys.method1 import METHOD as METHOD1
    from mlsys.model import UNet, build_model
    from mlsys.params import AugmentParams, DataParams, Method1Params, ModelParams

    clean = tmp_path / "clean.h5"
    prepare.prepare(DataParams(n_images=18, image_size=16), clean, progress=False)
    torch.manual_seed(0)
    mcfg = ModelParams(base=4, depth=2)
    model = build_model(mcfg).eval()
    cfg = AugmentParams(method1=Method1Params(steps=2, batch_size=4))
    build_set(METHOD1, model, clean, tmp_path / "ref.h5", cfg, torch.device("cpu"), {}, progress=False)

    class Crash(UNet):  # the same weights; dies in the middle of the third chunk
        calls = 0

        def forward(self, x):
            Crash.calls += 1
            if Crash.calls > 2 * 6 * 2 + 3:     # 2 chunks x 6 classes x 2 steps, then 3 more
                raise KeyboardInterrupt
            return super().forward(x)

    crash = Crash(n_classes=6, base=4, depth=2, variant=mcfg.variant, init=mcfg.init)
    crash.load_state_dict(model.state_dict())
    out = tmp_path / "m1.h5"
    with pytest.raises(KeyboardInterrupt):
        build_set(METHOD1, crash.eval(), clean, out, cfg, torch.device("cpu"), {}, progress=False)
    partial = tmp_path / ".m1.h5.partial"
    assert not out.exists() and sorted(p.name for p in partial.glob("*.npz")) == ["000000.npz", "000001.npz"]
    capsys.readouterr()
    build_set(METHOD1, model, clean, out, cfg, torch.device("cpu"), {}, progress=False)
    assert "method1: resumed 8 of 12 images" in capsys.readouterr().out
    assert_same_h5(out, tmp_path / "ref.h5")
    assert not partial.exists()

    # other settings (or another model or data): the finished chunks are not reused
    with pytest.raises(KeyboardInterrupt):
        Crash.calls = 0
        build_set(METHOD1, crash, clean, out, cfg, torch.device("cpu"), {}, progress=False)
    other = AugmentParams(method1=Method1Params(steps=2, batch_size=4, eps=0.02))
    build_set(METHOD1, model, clean, tmp_path / "m1.h5", other, torch.device("cpu"), {}, progress=False)
    assert "resumed" not in capsys.readouterr().out


# --------------------------------------------------------------------------- security
def test_redact_strips_credentials():
    from mlsys.tracking import redact

    assert redact("http://alice:s3cret@mlflow.example.org:5000/") == "http://mlflow.example.org:5000/"
    assert redact("https://tok@host/path") == "https://host/path"
    assert redact("postgresql://u:p@ss@db:5432/mlflow") == "postgresql://db:5432/mlflow"
    assert redact("http://host/?token=abc&x=1&api_key=zz") == "http://host/?token=***&x=1&api_key=***"
    assert redact("sqlite:////work/mlflow.db") == "sqlite:////work/mlflow.db"


def test_logged_tracking_uri_has_no_password(monkeypatch):
    """The tags every run gets carry the tracking URI without its credentials."""
    from mlsys import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret@127.0.0.1:1")
    tags = tracking.run_tags()
    assert tags["mlsys.tracking_uri"] == "http://127.0.0.1:1"
    assert not [v for v in tags.values() if "s3cret" in v or "alice" in v]


def test_runs_sweep_has_help(capsys):
    from mlsys.cli import build_parser

    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["runs", "sweep", "--help"])
    assert done.value.code == 0 and "--older-than HOURS" in capsys.readouterr().out


def test_servers_bind_localhost_by_default():
    from mlsys.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    hosts = {name: sub.parse_args([]).host for name, sub in commands.items()
             if any(a.dest == "host" for a in sub._actions)}
    assert "ui" in hosts and set(hosts.values()) == {"127.0.0.1"}, hosts


def test_a_refused_output_leaves_no_empty_folder(tmp_path):
    from mlsys.files import atomic_path

    for write_first in (True, False):   # refused half-way, or before anything was written
        with pytest.raises(RuntimeError):
            with atomic_path(tmp_path / "data/seed0/x.h5") as tmp:
                if write_first:
                    tmp.write_text("half")
                raise RuntimeError("refused")
        assert list(tmp_path.iterdir()) == []
    with atomic_path(tmp_path / "data/seed0/x.h5") as tmp:
        tmp.write_text("whole")
    assert (tmp_path / "data/seed0/x.h5").read_text() == "whole"
