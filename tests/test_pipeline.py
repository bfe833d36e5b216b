"""End to end: a copy of the repository runs `dvc repro` on a micro configuration;
the MLflow store then holds one pipeline run with a child run per stage, with
metrics, figures, the model and dataset inputs. Real DVC, real MLflow (SQLite)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MICRO = {
    "data": {"n_images": 27, "image_size": 16},
    "model": {"base": 4, "depth": 2},
    "train": {"epochs": 2, "batch_size": 6, "device": "cpu"},
    "evaluate": {"n_panel": 2, "attack": {"steps": 2}},
    "augment": {"device": "cpu", "method1": {"steps": 1}, "method2": {"chunk": 200}},
}
STAGES = {"prepare", "train@model1", "train@model2", "train@model3", "train@model4", "augment@method1",
          "augment@method2", "evaluate@model1", "evaluate@model2", "evaluate@model3", "evaluate@model4",
          "report"}


def merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def make_repo(dest: Path, overrides: dict) -> Path:
    for name in ("mlsys", "csrc"):
        if (ROOT / name).exists():
            shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "setup.py", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, dest / name)
    (dest / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", dest / ".dvc" / "config")
    shutil.copy(ROOT / ".dvc" / ".gitignore", dest / ".dvc" / ".gitignore")
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    env = env_for(dest)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


def env_for(repo: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", DVC_NO_ANALYTICS="1",
               MLFLOW_DISABLE_TELEMETRY="true", MLSYS_PROGRESS="0", PYTHONPATH=str(repo),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               OMP_NUM_THREADS="1")
    return env


def run(repo: Path, *cmd: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=repo, env=env_for(repo), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("repo"), MICRO)
    first = run(repo, "dvc", "repro")
    return repo, first


def runs_of(repo: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mlsys")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def test_repro_logs_parent_and_stage_runs(pipeline):
    repo, _ = pipeline
    client, runs = runs_of(repo)
    parents = [r for r in runs if r.data.tags.get("mlsys.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == STAGES
    assert all(r.info.status == "FINISHED" for r in children.values())

    train = children["train@model1"]
    assert train.data.params["train.epochs"] == "2" and train.data.params["model.base"] == "4"
    history = client.get_metric_history(train.info.run_id, "valid/loss")
    assert [m.step for m in history] == [0, 1]
    assert "best/val_dice" in train.data.metrics and "best/epoch" in train.data.metrics
    assert train.data.tags["dvc.stage"] == "train@model1" and len(train.data.tags["git.commit"]) == 40
    artifacts = {a.path for a in client.list_artifacts(train.info.run_id, "figures")}
    assert {"figures/loss_curves.png", "figures/predictions_valid.png"} <= artifacts
    inputs = [d.dataset.name for d in train.inputs.dataset_inputs]
    assert "clean.h5" in inputs
    models = client.search_logged_models([train.info.experiment_id],
                                         filter_string=f"source_run_id = '{train.info.run_id}'")
    assert [m.name for m in models] == ["model"], "the trained U-Net is logged as an MLflow model"

    ev = children["evaluate@model3"]
    for key in ("clean/accuracy", "clean/dice", "clean/paper_dice", "attack/accuracy", "attack/jaccard",
                "clean/dice/neoplastic"):
        assert key in ev.data.metrics
    assert children["augment@method2"].data.metrics["n_images"] == 18


def test_outputs_report_and_second_repro_runs_nothing(pipeline):
    repo, first = pipeline
    for path in ("data/clean.h5", "data/method1.h5", "data/method2.h5", "models/model4.pt",
                 "metrics/eval/model1.json", "reports/table1.csv", "reports/table2.md", "reports/report.md",
                 "reports/figures/validation_loss.png", "dvc.lock"):
        assert (repo / path).exists(), path
    table = (repo / "reports/table2.csv").read_text().splitlines()
    assert table[0].startswith("model,loss,accuracy,dice") and len(table) == 5
    _, before = runs_of(repo)
    again = run(repo, "dvc", "repro")
    assert "didn't change, skipping" in again.stdout and "Running stage" not in again.stdout
    _, after = runs_of(repo)
    assert len(after) == len(before), "a stage skipped from the DVC cache logs no run"


def test_compare_prints_both_tables(pipeline):
    repo, _ = pipeline
    out = run(repo, sys.executable, "-m", "mlsys", "compare").stdout
    assert "Table 1" in out and "Table 2" in out and "faithful attack, 2 steps" in out
    assert out.count("| model | loss | accuracy | dice |") == 2
    assert sum(line.startswith("| model4 |") for line in out.splitlines()) == 2


def test_exp_run_changes_only_what_depends_on_the_param(pipeline):
    repo, _ = pipeline
    out = run(repo, "dvc", "exp", "run", "-S", "evaluate.attack.steps=1").stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"evaluate@model1", "evaluate@model2", "evaluate@model3", "evaluate@model4", "report"}
