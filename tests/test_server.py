"""A team's tracking server: `python -m mlsys server` (SQLite database backend, served
artifacts) on a free local port; a micro pipeline logs to it through
MLFLOW_TRACKING_URI=http://...; the runs are read back over HTTP (REST API)."""
from __future__ import annotations

import urllib.parse
import urllib.request

import pytest

from micro import MICRO, env_for, http_json, make_repo, mlflow_service, run

pytestmark = pytest.mark.slow  # end-to-end runs of the micro pipeline (`pytest -m 'not slow'` skips them)


def test_pipeline_logs_to_a_tracking_server(tmp_path):
    (tmp_path / "repo").mkdir()
    repo = make_repo(tmp_path / "repo", MICRO)
    db, artifacts = tmp_path / "server" / "mlflow.db", tmp_path / "server" / "artifacts"
    with mlflow_service(repo, "server", "--backend-store-uri", f"sqlite:///{db}",
                        "--artifacts-destination", str(artifacts)) as url:
        run(repo, "dvc", "repro", "train-model1@0", env=env_for(repo, MLFLOW_TRACKING_URI=url))

        exp = http_json(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=mlsys")["experiment"]
        found = http_json(f"{url}/api/2.0/mlflow/runs/search",
                          {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
        by_name = {r["info"]["run_name"]: r for r in found}
        assert {"prepare", "train-model1@0"} <= set(by_name) and len(by_name) == 3, sorted(by_name)
        parent = next(r for n, r in by_name.items() if n.startswith("pipeline "))
        train = by_name["train-model1@0"]
        tags = {t["key"]: t["value"] for t in train["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == parent["info"]["run_id"]
        assert tags["mlsys.tracking_uri"] == url and tags["mlsys.model"] == "model1"
        assert all(r["info"]["status"] == "FINISHED" for r in found)
        metrics = {m["key"]: m["value"] for m in train["data"]["metrics"]}
        assert {"kept/valid_dice", "kept/epoch", "valid/loss"} <= set(metrics)

        # artifacts go through the server (mlflow-artifacts:/) into its destination folder
        assert train["info"]["artifact_uri"].startswith("mlflow-artifacts:/")
        listed = http_json(f"{url}/api/2.0/mlflow/artifacts/list?"
                           + urllib.parse.urlencode({"run_id": train["info"]["run_id"], "path": "figures"}))
        assert "figures/loss_curves.png" in {f["path"] for f in listed["files"]}
        query = urllib.parse.urlencode({"path": "figures/loss_curves.png", "run_uuid": train["info"]["run_id"]})
        with urllib.request.urlopen(f"{url}/get-artifact?{query}", timeout=30) as resp:
            assert resp.read(8) == b"\x89PNG\r\n\x1a\n"
        assert list(artifacts.rglob("loss_curves.png")), "artifacts are stored by the server"
    assert not (repo / "mlflow.db").exists() and not (repo / "mlartifacts").exists(), "nothing logged locally"
