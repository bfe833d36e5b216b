"""End to end: a copy of the repository runs `dvc repro` on a micro configuration;
the MLflow store then holds one pipeline run with a child run per stage, with
metrics, figures, the model and dataset inputs. Real DVC, real MLflow (SQLite)."""
from __future__ import annotations

import json
import sys

import pytest
import yaml

from micro import PIPELINE_SEEDS, run, runs_of, stages
from mlsys.params import EXPERIMENT

pytestmark = pytest.mark.slow  # end-to-end runs of the micro pipeline (`pytest -m 'not slow'` skips them)


def test_repro_logs_parent_and_stage_runs(pipeline):
    repo, _ = pipeline
    client, runs = runs_of(repo)
    parents = [r for r in runs if r.data.tags.get("mlsys.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == stages(PIPELINE_SEEDS)
    assert {children[f"train-model2@{s}"].data.tags["mlsys.seed"] for s in PIPELINE_SEEDS} == {"0", "1"}
    assert all(r.info.status == "FINISHED" for r in children.values())

    train = children["train-model1@0"]
    assert train.data.params["train.epochs"] == "2" and train.data.params["model.base"] == "4"
    history = client.get_metric_history(train.info.run_id, "valid/loss")
    assert [m.step for m in history] == [0, 1]
    assert "kept/valid_dice" in train.data.metrics and "kept/epoch" in train.data.metrics
    assert train.data.tags["dvc.stage"] == "train-model1@0" and len(train.data.tags["git.commit"]) == 40
    artifacts = {a.path for a in client.list_artifacts(train.info.run_id, "figures")}
    assert {"figures/loss_curves.png", "figures/predictions_valid.png"} <= artifacts
    inputs = [d.dataset.name for d in train.inputs.dataset_inputs]
    assert "clean.h5" in inputs
    models = client.search_logged_models([train.info.experiment_id],
                                         filter_string=f"source_run_id = '{train.info.run_id}'")
    assert [m.name for m in models] == ["model"], "the trained U-Net is logged as an MLflow model"

    adv = children["train-pgdat@0"]   # a baseline: its own stage module, the same kind of run
    assert adv.data.params["adversarial.steps"] == "1" and "adversarial.beta" not in adv.data.params
    assert adv.data.params["adversarial.label"] == "PGD-AT (1 step, 4/255, half clean)"
    assert adv.data.tags["mlsys.method"] == "pgdat" and adv.data.params["train.epochs_effective"] == "1"
    assert [m.step for m in client.get_metric_history(adv.info.run_id, "valid/loss")] == [0]
    assert "adversarial.beta" in children["train-trades@0"].data.params

    ev = children["evaluate-model3@0"]
    for key in ("clean/accuracy", "clean/dice", "clean/paper_dice", "attack/accuracy", "attack/jaccard",
                "clean/dice/neoplastic"):
        assert key in ev.data.metrics
    assert children["augment-method2@0"].data.metrics["n_images"] == 18
    # the robustness protocol (micro: radii [2, 8], 2 steps): worst case, per attack, per tissue, curves
    assert {"robust/eps2/dice", "robust/eps8/accuracy", "robust/sea/eps8/dice"} <= set(ev.data.metrics)
    assert any(k.startswith("robust/tissue/") for k in ev.data.metrics)
    curve = client.get_metric_history(ev.info.run_id, "curve/worst/eps8/dice")
    assert [m.step for m in curve] == [0, 1, 2], "the curves are step metrics: charts in the MLflow UI"
    assert [m.step for m in client.get_metric_history(ev.info.run_id, "curve/paper/accuracy")] == [0, 1, 2]


def test_outputs_report_and_second_repro_runs_nothing(pipeline):
    repo, first = pipeline
    for path in ("data/clean.h5", "data/seed0/method1.h5", "data/seed0/method2.h5", "data/seed1/method1_test.h5",
                 "data/seed1/method2_test.h5", "models/seed0/model4.pt", "reports/cross.csv", "reports/cross.md",
                 "reports/figures/cross_evaluation.png",
                 "metrics/eval/seed0/model1.json", "reports/table1.csv", "reports/table2.md", "reports/report.md",
                 "reports/figures/validation_loss.png", "dvc.lock"):
        assert (repo / path).exists(), path
    table = (repo / "reports/table2.csv").read_text().splitlines()
    # the four models and the two baselines, means over seeds
    assert table[0].startswith("model,loss,accuracy,dice") and len(table) == 1 + len(EXPERIMENT)
    assert [r.split(",")[0] for r in table[-2:]] == ["pgdat", "trades"]
    seeds = (repo / "reports/table2_seeds.csv").read_text().splitlines()
    assert len(seeds) == 1 + len(EXPERIMENT) * len(PIPELINE_SEEDS) and seeds[1].startswith("model1 seed 0,")
    paired = (repo / "reports/paired.csv").read_text().splitlines()
    # every other model from model 1 and from PGD-AT, clean, attacked and on both transfer sets, 3 metrics
    assert paired[0] == "model,baseline,split,metric,mean,std,lo,hi,n_seeds"
    assert len(paired) == 1 + 2 * (len(EXPERIMENT) - 1) * 4 * 3
    # the cross-evaluation: every model on the test split as model 1 perturbed it (method one, method two)
    ev = json.loads((repo / "metrics/eval/seed1/trades.json").read_text())
    assert 0 <= ev["transfer_method1"]["dice"] <= 1 and 0 <= ev["transfer_method2"]["accuracy"] <= 1
    cross = (repo / "reports/cross.csv").read_text().splitlines()
    assert cross[0].startswith("model,clean dice,clean accuracy,method one transfer dice,method one transfer accuracy,"
                               "method two transfer dice,method two transfer accuracy,paper's attack dice,")
    assert len(cross) == 1 + len(EXPERIMENT)
    page = (repo / "reports/report.md").read_text()
    assert "mean ± std over 2 seeds" in page and "Machine:" in page and "torch " in page
    assert "PGD-AT (1 step, 4/255, half clean)" in page and "TRADES (beta 6, 1 step, 4/255)" in page
    assert "Data: synthetic(seed=" in page and "Table 1: clean test split of synthetic(seed=" in page  # the protocol
    ev = json.loads((repo / "metrics/eval/seed1/model2.json").read_text())["robust"]
    assert ev["radii"] == [2.0, 8.0] and set(ev["worst"]) == {"2", "8"} and set(ev["per_attack"]) == {"segpgd", "cospgd", "sea"}
    assert ev["curves"]["worst"]["8"]["steps"] == [0, 1, 2] and ev["tissue"]
    curve = (repo / "plots/eval/seed1/model2/robust_curve.csv").read_text().splitlines()
    assert curve[0] == "attack,radius,step,dice,accuracy" and len(curve) == 1 + 4 * 2 * 3   # 3 attacks + worst
    robust = (repo / "reports/robust.csv").read_text().splitlines()
    assert robust[0] == "model," + ",".join(f"eps {r}/255 {m}" for r in (2, 8)
                                            for m in ("dice", "accuracy", "miou", "nmiou", "miou_image"))
    assert len(robust) == 1 + len(EXPERIMENT)
    assert (repo / "reports/tissue.csv").read_text().startswith("tissue,model1 clean dice,model1 eps 8/255 dice,")
    assert ("Robustness: worst case per image of SegPGD, 2 steps, CosPGD, 2 steps, "
            "SEA-style, 2 steps (reduced from 300)") in page and "figures/robust_steps.png" in page  # honest names
    report_md = (repo / "reports/report.md").read_text()
    assert "## Findings" in report_md and report_md.index("## Findings") < report_md.index("Table 1")
    assert "**Transferred: the test split perturbed by method two with model 1 (white-box for model 1)**" in report_md
    assert "**Cross-evaluation: Dice of every model" in report_md
    assert json.loads((repo / "metrics/report.json").read_text())["findings"]
    assert (repo / "reports/robust_paired.csv").exists()
    for name in ("robust_radius.png", "robust_steps.png"):
        assert (repo / "reports/figures" / name).stat().st_size > 1000, name
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
    # both tables, the paired one twice (from model 1 and from PGD-AT), the cross-evaluation
    assert sum(line.startswith("| model4 |") for line in out.splitlines()) == 5
    assert "mean ± std over 2 seeds" in out and "Paired differences from model 1" in out
    assert "**Cross-evaluation: Dice of every model" in out and "| method one transfer |" in out
    assert "Data: synthetic(seed=" in out and "Table 1: clean test split of synthetic(seed=" in out  # the protocol


def test_champion_is_registered_and_predicts_like_the_dvc_weights(pipeline):
    import mlflow
    import torch

    from micro import store
    from mlsys import data, report
    from mlsys.params import load_params
    from mlsys.weights import load_weights

    repo, _ = pipeline
    best = report.champion(report.mean_evals({s: {m: json.loads((repo / f"metrics/eval/seed{s}/{m}.json").read_text())
                                                  for m in report.MODEL_LABELS} for s in PIPELINE_SEEDS}))
    summary = json.loads((repo / "metrics/report.json").read_text())
    assert summary["champion"]["model"] == best and summary["champion"]["registered_model"] == "mlsys-unet"
    client = mlflow.MlflowClient(tracking_uri=store(repo), registry_uri=store(repo))
    version = client.get_model_version_by_alias("mlsys-unet", "champion")
    assert version.tags["mlsys.model"] == best and int(version.version) == summary["champion"]["version"]
    assert client.get_run(version.run_id).info.run_name == f"train-{best}@0", "the model logged by its training"
    outs = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][f"train-{best}@0"]["outs"]
    assert version.tags["mlsys.weights_md5"] == next(o["md5"] for o in outs if o["path"] == f"models/seed0/{best}.pt")

    mlflow.set_tracking_uri(store(repo))
    mlflow.set_registry_uri(store(repo))
    served = mlflow.pytorch.load_model("models:/mlsys-unet@champion")
    images, _ = data.head(repo / "data/clean.h5", "test", 5)
    weights = load_weights(repo / f"models/seed0/{best}.pt", load_params(repo / "params.yaml").model).eval()
    with torch.no_grad():
        expected, got = weights(images), served(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_dvc_exp_show_and_plots_read_the_pipeline_outputs(pipeline, tmp_path):
    repo, _ = pipeline
    show = json.loads(run(repo, "dvc", "exp", "show", "--json").stdout)
    metrics = show[0]["data"]["metrics"]  # the workspace
    report_metrics = metrics["metrics/report.json"]["data"]
    assert report_metrics["champion"]["model"] in EXPERIMENT
    assert len(report_metrics["mlflow"]["pipeline_run_id"]) == 32
    assert len(metrics["metrics/eval/seed0/model2.json"]["data"]["mlflow_run_id"]) == 32
    assert set(report_metrics["attack"]["model3"]["dice"]) == {"mean", "std"}        # aggregates for `dvc exp show`
    assert set(report_metrics["paired"]["model2"]["attack_dice"]) == {"mean", "lo", "hi"}
    assert set(report_metrics["paired_pgdat"]["trades"]["attack_dice"]) == {"mean", "lo", "hi"}
    assert set(report_metrics["robust"]["model4"]["eps8"]["dice"]) == {"mean", "std"}
    assert report_metrics["data_split"].startswith("synthetic")  # (DVC leaves lists such as "findings" out)
    run(repo, "dvc", "exp", "show", "--no-pager")  # the table view flattens every key of every metrics file
    assert (repo / "plots/report/robust_radius.csv").read_text().startswith("radius,model1_dice,model1_dice_std,")
    assert (repo / "plots/report/robust_steps.csv").read_text().startswith("step,model1_segpgd,")
    rows = (repo / "plots/report/per_class_dice.csv").read_text().splitlines()
    assert rows[0] == "label,model,class,clean_dice,attack_dice" and rows[1].startswith("model1 background,")
    out = tmp_path / "plots"
    run(repo, "dvc", "plots", "show", "-o", str(out))
    page = (out / "index.html").read_text()
    for title in ("validation loss", "training loss", "per-class Dice, clean test split", "per-class Dice, under attack",
                  "worst-case Dice against the L-inf radius", "worst-case Dice along the attack steps"):
        assert title in page, title
