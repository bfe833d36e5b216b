"""The benchmarks run the stages' own functions: the fold-2 extrapolation's arithmetic, and
the one-command GPU check at its CPU size (what a lent GPU machine runs, end to end)."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_fold2_extrapolation_counts_every_stage_of_the_experiment():
    import pipeline

    per = {"train step": 1.0, "forward": 0.5, "method one": 2.0, "method two": 3.0, "evaluation": 4.0,
           "PGD step": 0.1}
    rows = {r["stage"].split(" (")[0]: r for r in pipeline.extrapolate(per, seeds=3)}
    # 4 models x 60 epochs x 1682 images (model 4: a third of the epochs on 3x the images), per seed
    assert rows["training"]["images"] == 3 * 4 * 60 * 1682
    assert rows["validation passes"]["images"] == 3 * 4 * 60 * 280
    assert rows["method one"]["images"] == rows["method two"]["images"] == 3 * 1682
    assert rows["evaluation"]["images"] == 3 * 4 * 561
    assert rows["method two"]["minutes"] == pytest.approx(3 * 1682 * 3.0 / 60)


def test_protocol_benchmark_validates_every_attack_and_its_totals_add_up(tmp_path):
    """benchmarks/protocol.py --quick: every attack of the protocol checked (in the eps-ball,
    accuracy below the clean one, exactly `steps` passes a loss) and timed; the evaluate stage's
    robust_chunk runs the passes the cost model counts; each total is images x radii x steps of
    the settings it names, priced at the measured step costs."""
    import protocol

    from mlsys.presets import PAPER
    from mlsys.robust import ATTACKS

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/protocol.py"), "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("protocol_quick_*.json")
    r = json.loads(path.read_text())
    assert r["settings"] == asdict(protocol.CONFIGS["quick"]()) and r["settings"]["size"] == 16
    assert set(r["cpu_flags"]) == {"avx2", "avx512f", "avx512_bf16", "amx_tile"} and r["cpu"] and r["threads"] >= 1
    steps = r["settings"]["steps"]
    assert set(r["validation"]) == set(r["attacks"]) == set(ATTACKS)
    for a, v in r["validation"].items():
        assert v["clean_accuracy"] == 1.0 and v["accuracy"] < 1.0, a  # labels: the model's own prediction
        assert v["linf"] <= 8 / 255 + 1e-6 and v["grad_forwards"] == steps * (3 if a == "sea" else 1), a
        assert r["attacks"][a]["s_per_image_step"] > 0 and r["attacks"][a]["nograd_forwards"] == v["nograd_forwards"]
    check = r["protocol_check"]  # the evaluate stage's protocol ran exactly the attacks' passes
    assert check["grad_forwards"] == sum(r["validation"][a]["grad_forwards"] for a in check["attacks"])
    assert check["measured_s"] > 0 and check["predicted_s"] > 0
    step_s = {a: x["s_per_image_step"] for a, x in r["attacks"].items()}
    nograd = {a: x["nograd_forwards"] for a, x in r["attacks"].items()}
    totals = r["totals"]
    assert set(totals) == {"params.yaml", "full strength", "full strength, every attack", "PAPER preset"}
    for name, t in totals.items():
        assert t["hours"] == pytest.approx(sum(t["attack_hours"].values()) + t["protocol_forward_hours"]), name
        assert t["image_steps"] == t["images"] * len(t["radii"]) * sum(
            n * (3 if a == "sea" else 1) for a, n in t["steps"].items()), name
        assert t == protocol.protocol_rows(step_s, nograd, r["forward_s_per_image"], protocol.PROTOCOL_FORWARDS,
                                           t["images"], t["radii"], t["steps"]), name
        assert t["gpu_minutes_estimate"] == pytest.approx(t["image_steps"] * protocol.H100_STEP_S / 60), name
    assert totals["params.yaml"]["images"] == 67  # the default data's test split
    full = totals["full strength"]
    assert full["images"] == 561 and full["radii"] == PAPER["evaluate.robust.radii"]
    assert full["steps"] == {"segpgd": 100, "cospgd": 100, "sea": 300} and full["image_steps"] == 561 * 6 * 1100
    assert totals["full strength, every attack"]["steps"] == {"pgd": 100, "segpgd": 100, "cospgd": 100, "apgd": 100,
                                                             "sea": 300, "padam-ce": 200, "padam-cos": 200}
    assert totals["PAPER preset"]["steps"] == {"segpgd": 300, "cospgd": 300, "sea": 300}
    assert "ESTIMATE, not measured" in proc.stdout and "SEA (300 steps)" in totals["full strength"]["labels"]


@pytest.mark.slow
def test_gpu_check_runs_its_steps_at_the_cpu_size(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--cpu", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in ("op-tests", "method2", "pipeline"):
        assert f"== {step}" in proc.stdout and (out / f"{step}.log").exists(), step
    assert "FAILED" not in proc.stdout
    import pipeline

    result = json.loads((out / "pipeline_cpu-small_cpu.json").read_text())
    assert {r["stage"].split(" (")[0] for r in result["fold2"]} == {
        "training", "validation passes", "method one", "method two", "evaluation"}
    # the rows are the fold-2 extrapolation of the stage times it measured, at the settings named
    assert result["settings"] == asdict(pipeline.CONFIGS["cpu-small"]()) and result["seeds"] == 1
    assert all(result["per_image_s"][k] > 0 for k in ("train step", "PGD step", "method one", "method two",
                                                       "method two, screened", "evaluation", "forward"))
    assert result["fold2"] == pipeline.extrapolate(result["per_image_s"], result["seeds"])
    assert result["total_minutes"] == sum(r["minutes"] for r in result["fold2"])
    assert result["ops"] != "reference"  # the op tests required native ops: those are timed
    assert "attack loops fp32" in (out / "pipeline.log").read_text()  # cpu-small: amp off, as resolved
    # method two's benchmark validated the native ops against the references before timing them
    m2 = json.loads((out / "method2_cpu-small.json").read_text())
    assert m2["backend"] != "reference" and m2["config"]["size"] == 32  # not the reference against itself
    valid = m2["runs"]["validation"]["float32"]
    assert valid["candidates_max_abs_err"] <= 1e-6 and valid["scores_max_abs_err"] <= 1e-5
    assert "(b) fp32" in m2["runs"]["timings"] and m2["runs"]["fastest"] in m2["runs"]["timings"]


def test_screened_benchmark_validates_and_reports_every_search(tmp_path):
    """benchmarks/screened.py on the pipeline's own kind of inputs (weights and data files):
    it checks the library's searches against the exact tables, then writes one row per search."""
    import torch

    from mlsys import prepare
    from mlsys.model import build_model
    from mlsys.params import DataParams, load_params
    from mlsys.weights import save_weights

    # 16x16 patches: the checks are the same at any size, the bf16 screen (emulated on AVX2-only
    # CPUs) a quarter of the default's 32x32 cost
    prepare.prepare(DataParams(n_images=30, image_size=16), tmp_path / "clean.h5", progress=False)
    mp = load_params(ROOT / "params.yaml").model
    torch.manual_seed(0)
    save_weights(build_model(mp), mp, tmp_path / "model1.pt")
    out = tmp_path / "screened.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/screened.py"), "--data", str(tmp_path / "clean.h5"),
                           "--weights", str(tmp_path / "model1.pt"), "--images", "3", "--time-images", "1",
                           "--ks", "4", "--exact-tops", "4", "--threads", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["search"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"exact fp32", "screened", "first-order*", "exact, bf16 screen"}
    assert rows["exact fp32"]["exact_share"] == 1.0 and rows["exact fp32"]["forwards"] == 729
    assert 13 <= rows["screened"]["forwards"] < 729 and rows["screened"]["images"] == 3


@pytest.mark.slow
def test_repro_benchmark_splits_every_stage_of_the_pipeline_run(pipeline, tmp_path):
    """benchmarks/repro.py --no-run on the session's micro pipeline: every stage run is counted
    in its group, with the start-up and compute each stage logged, and the parts add up."""
    import micro

    repo, _ = pipeline
    out = tmp_path / "repro.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/repro.py"), "--no-run", "--repo", str(repo),
                           "--json", str(out)], cwd=repo, env=micro.env_for(repo), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {s["stage"] for s in result["stages"]} == micro.stages(micro.PIPELINE_SEEDS)
    groups = result["groups"]
    assert groups["train-model1"]["stages"] == len(micro.PIPELINE_SEEDS) and groups["report"]["stages"] == 1
    assert all(s["startup_s"] > 0 for s in result["stages"])
    assert all(s["compute_s"] > 0 for s in result["stages"] if s["stage"] != "report")
    for g in [*groups.values(), result["total"]]:
        assert g["total_s"] == pytest.approx(g["startup_s"] + g["compute_s"] + g["tracking_s"])
    assert "start-up" in proc.stdout and "all stages" in proc.stdout


def test_rerun_matches_findings_and_names_every_flip(tmp_path, capsys):
    """benchmarks/rerun.py reads the findings the report writes: a re-run whose model 3 is no
    longer better than model 1 (nor PGD-AT, which scores as model 1 here) under the paper's
    attack (one seed's difference turned around) flips exactly those conclusions; the rest
    read the same; a file without findings is one line."""
    import rerun

    from mlsys import report
    from mlsys.params import EXPERIMENT

    def findings(model3: list[float]) -> list[str]:
        values = {m: [0.30, 0.31, 0.29] for m in EXPERIMENT}
        values["model2"] = [0.20, 0.22, 0.21]                       # worse than model 1 in both runs
        values["model3"] = model3
        per_seed = {s: {m: {"clean": {"dice": 0.5, "accuracy": 0.9},
                            "attack": {"dice": values[m][s], "accuracy": 0.8}} for m in values} for s in range(3)}
        return report.findings(report.build_tables(per_seed))

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"findings": findings([0.35, 0.36, 0.34]), "seeds": [0, 1, 2]}))  # +0.05 each: better
    b.write_text(json.dumps({"findings": findings([0.35, 0.36, 0.25]), "seeds": [0, 1, 2]}))  # +0.05, +0.05, -0.04
    res = rerun.compare(json.loads(a.read_text())["findings"], json.loads(b.read_text())["findings"])
    flips = [(r["comparison"], r["metric"]) for r in res["rows"] if not r["same"]]
    assert flips == [(f"Model 3 (method2) vs {b}, under the paper's attack", "Dice")   # PGD-AT scores as model 1
                     for b in ("model 1 (clean)", "PGD-AT")]
    row = next(r for r in res["rows"] if not r["same"])
    assert (row["a_conclusion"], row["b_conclusion"]) == ("better", "no conclusion")
    assert row["a"] == "+0.050 [+0.050, +0.050]"
    n = len(res["rows"])
    assert res["counts"] == {"findings": n, "same": n - 2, "flipped": 2, "resolved_in_either": res["counts"][
        "resolved_in_either"], "resolved_in_both_alike": res["counts"]["resolved_in_either"] - 2}
    assert any(r["comparison"].startswith("Model 2 (method1) vs model 1") and r["a_conclusion"] == "worse"
               and r["same"] for r in res["rows"])
    assert rerun.main([str(a), str(b), "--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    assert "FLIPPED Model 3 (method2) vs model 1 (clean), under the paper's attack / Dice" in out
    # B: mean 0.02, sd 0.052 over 3 seeds; t(0.975, m-1) * 0.052 / sqrt(m) < 0.02 first at m = 29 (by hand)
    assert "seeds to clear the interval, as measured: A 3, B 29" in out
    assert rerun.seeds_to_resolve("+0.020 [-0.109, +0.149]", 3) == 29
    assert json.loads((tmp_path / "out.json").read_text())["counts"]["flipped"] == 2
    (tmp_path / "bad.json").write_text("{}")
    assert rerun.main([str(a), str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rerun: error: ") and "bad.json" in err[0]
