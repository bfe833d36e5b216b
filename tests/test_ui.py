"""The MLflow UI as a user sees it: `python -m mlsys ui` on the store of a micro
pipeline, rendered by a real headless Chromium. Screenshots of the training-runs view
and of a model's run page are kept under $MLSYS_TEST_ARTIFACTS (else a pytest
temporary folder; the path is printed)."""
from __future__ import annotations

import os
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from micro import http_json, mlflow_service, runs_of
from mlsys.params import EXPERIMENT

pytestmark = pytest.mark.slow  # end-to-end runs of the micro pipeline (`pytest -m 'not slow'` skips them)

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1800,1000", "--run-all-compositor-stages-before-draw"]


def chromium() -> str:
    """Debian's chromium, installed here if missing (as root with apt-get); else skip."""
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            subprocess.run(cmd, capture_output=True, timeout=900, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if shutil.which("chromium"):
            return shutil.which("chromium")
    pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get: "
                "`apt-get install -y chromium`)")


def browse(url: str, profile: Path, screenshot: Path, budget_ms: int = 15000) -> str:
    """Render ``url`` in a fresh profile (``budget_ms`` of virtual time for the page's
    requests and scripts); write a PNG to ``screenshot`` and return the DOM."""
    proc = subprocess.run([chromium(), *FLAGS, f"--virtual-time-budget={budget_ms}", f"--user-data-dir={profile}",
                           f"--screenshot={screenshot}", "--dump-dom", url], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert screenshot.stat().st_size > 10_000, f"{screenshot} looks empty"
    return proc.stdout


def test_mlflow_ui_shows_the_four_models(pipeline, artifacts_dir, tmp_path, capsys):
    repo, _ = pipeline
    client, runs = runs_of(repo)
    exp_id = runs[0].info.experiment_id
    evaluate = {r.data.tags["mlsys.model"]: r for r in runs if r.data.tags.get("mlsys.stage") == "evaluate"
                and r.data.tags.get("mlsys.seed") == "0"}
    shots = {name: artifacts_dir / f"mlflow_{name}.png"
             for name in ("training_runs", "four_models", "run_page", "report")}
    with mlflow_service(repo, "ui") as url:
        # the REST API the page itself uses: one filter (as typed into the search box) gives a
        # model's train and evaluate runs
        found = http_json(f"{url}/ajax-api/2.0/mlflow/runs/search",
                          {"experiment_ids": [exp_id], "filter": "tags.mlsys.model = 'model2'"})["runs"]
        assert sorted(r["info"]["run_name"] for r in found) == ["evaluate-model2@0", "evaluate-model2@1",
                                                                 "train-model2@0", "train-model2@1"]

        # the address `mlsys ui` prints: the pipeline run, its stage runs folded under it
        runs_view = f"{url}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
        dom = browse(runs_view, tmp_path / "p1", shots["training_runs"])
        assert "pipeline 20" in dom and "</strong> matching runs" in dom, f"see {shots['training_runs']}"

        # the comparison of docs/workflows.md: the evaluations filtered, sorted by attack/dice, as charts
        query = urllib.parse.urlencode({"searchFilter": "tags.mlsys.stage = 'evaluate'",
                                        "orderByKey": "metrics.`attack/dice`", "orderByAsc": "false",
                                        "compareRunsMode": "CHART"}, quote_via=urllib.parse.quote)
        dom = browse(f"{runs_view}&{query}", tmp_path / "p2", shots["four_models"])
        for model in ("model1", "model2", "model3", "model4"):
            assert f"evaluate-{model}@0" in dom, f"evaluate-{model}@0 is not shown (see {shots['four_models']})"
        assert f"<strong>{2 * len(EXPERIMENT)}</strong> matching runs" in dom and "attack/dice" in dom  # x two seeds

        # one model's run page: its metrics with their values
        run = evaluate["model3"]
        page = f"{url}/#/experiments/{exp_id}/runs/{run.info.run_id}?workflowType=machine_learning"
        dom = browse(page, tmp_path / "p3", shots["run_page"])
        assert "evaluate-model3@0" in dom and "attack/dice" in dom and "Finished" in dom
        assert "mlsys.model" in dom and "dvc.experiment" in dom, "the run's tags are shown"
        value = run.data.metrics["clean/dice"]
        assert repr(value)[:8] in dom, f"clean/dice {value} is not on the run page (see {shots['run_page']})"

        # the report page (Tables 1 and 2, every figure) in the artifact viewer of the pipeline run
        parent = run.data.tags["mlflow.parentRunId"]
        page = f"{url}/#/experiments/{exp_id}/runs/{parent}/artifactPath/report/report.html?workflowType=machine_learning"
        dom = browse(page, tmp_path / "p4", shots["report"], budget_ms=30000)  # the page loads in an iframe
        assert "report.html" in dom and 'class="mlflow-html-iframe"' in dom
    with capsys.disabled():
        print(f"\nMLflow UI screenshots: {' '.join(map(str, shots.values()))}")
