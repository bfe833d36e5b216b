"""DVC experiments queued and run in DVC's temporary workspaces log to the project's
own MLflow store (absolute URI), each under its own pipeline run tagged with the
experiment's name; only the stages that depend on the changed parameter run; `dvc exp
show` lists the experiments with their headline metrics and run ids."""
from __future__ import annotations

import json

import pytest

from micro import PIPELINE_SEEDS, clone, run, runs_of
from mlsys.params import EXPERIMENT

pytestmark = pytest.mark.slow  # end-to-end runs of the micro pipeline (`pytest -m 'not slow'` skips them)


def test_queued_experiments_land_in_the_project_store(pipeline, tmp_path):
    repo = clone(pipeline[0], tmp_path / "repo")
    run(repo, "git", "add", "-A")  # as a user would: commit the baseline (dvc.lock, metrics) first
    run(repo, "git", "commit", "-qm", "baseline")
    for name, eps in (("eps-02", "0.02"), ("eps-05", "0.05")):
        run(repo, "dvc", "exp", "run", "--queue", "-n", name, "-S", f"evaluate.attack.eps={eps}")
    out = run(repo, "dvc", "exp", "run", "--run-all").stdout
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]
    evaluate = [f"evaluate-{m}@{s}" for m in EXPERIMENT for s in PIPELINE_SEEDS]
    assert sorted(ran) == sorted(2 * (evaluate + ["report"])), "only what depends on evaluate.* runs"

    client, runs = runs_of(repo)
    for name, eps in (("eps-02", "0.02"), ("eps-05", "0.05")):
        mine = [r for r in runs if r.data.tags.get("dvc.experiment") == name]
        parents = [r for r in mine if r.data.tags.get("mlsys.kind") == "pipeline"]
        assert len(parents) == 1 and parents[0].info.run_name.endswith(f"[{name}]"), [r.info.run_name for r in mine]
        stages = {r.info.run_name for r in mine if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
        assert stages == {*evaluate, "report"}
        assert all(r.info.status == "FINISHED" for r in mine)
        assert {r.data.params["evaluate.attack.eps"] for r in mine if r.info.run_name.startswith("evaluate-")} == {eps}
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db")), "no store inside DVC's temporary workspaces"

    show = json.loads(run(repo, "dvc", "exp", "show", "--json").stdout)
    exps = {r["name"]: r for base in show for e in base.get("experiments") or [] for r in e["revs"]}
    assert {"eps-02", "eps-05"} <= set(exps), list(exps)
    for name in ("eps-02", "eps-05"):
        metrics = exps[name]["data"]["metrics"]
        run_id = metrics["metrics/report.json"]["data"]["mlflow"]["pipeline_run_id"]
        assert client.get_run(run_id).data.tags["dvc.experiment"] == name
        assert 0 <= metrics["metrics/eval/seed0/model1.json"]["data"]["attack"]["dice"] <= 1
    # the table of docs/experiments.md, as it shows it (its sample output is this command's, from this test)
    table = run(repo, "dvc", "exp", "show", "--drop", ".*", "--keep",
                "Experiment|evaluate.attack.eps|champion.*|.*pipeline_run_id").stdout
    print(table)
    assert "champion.seed" in table and "eps-02" in table and "eps-05" in table
