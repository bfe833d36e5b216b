"""The benchmarks run the stages' own functions: the fold-2 extrapolation's arithmetic, and
the one-command GPU check at its CPU size (what a lent GPU machine runs, end to end)."""
from __future__ import annotations

import json
import subprocess
import sys
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


@pytest.mark.slow
def test_gpu_check_runs_its_steps_at_the_cpu_size(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--cpu", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in ("op-tests", "method2", "pipeline"):
        assert f"== {step}" in proc.stdout and (out / f"{step}.log").exists(), step
    assert "FAILED" not in proc.stdout
    result = json.loads((out / "pipeline_cpu-small_cpu.json").read_text())
    assert {r["stage"].split(" (")[0] for r in result["fold2"]} == {
        "training", "validation passes", "method one", "method two", "evaluation"}
    assert all(r["ms_per_image"] > 0 for r in result["fold2"]) and result["total_minutes"] > 0
    assert (out / "method2_cpu-small.json").exists()
