"""The command line: help for every stage, one-line errors, failed runs end FAILED."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def mlsys(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLSYS_PROGRESS": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "mlsys", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("stage", ["prepare", "train", "augment", "evaluate", "report", "compare", "ui", "server"])
def test_every_stage_has_help(tmp_path, stage):
    out = mlsys(tmp_path, stage, "--help")
    assert out.returncode == 0 and "usage: mlsys" in out.stdout


def test_bad_param_is_one_line_naming_the_key(tmp_path):
    (tmp_path / "params.yaml").write_text("augment:\n  method1:\n    eps: -0.5\n")
    out = mlsys(tmp_path, "prepare")
    assert out.returncode == 2
    assert out.stderr.strip() == ("mlsys prepare: error: params: augment.method1.eps = -0.5 is invalid; "
                                  "expected >= 0")
    (tmp_path / "params.yaml").write_text("data:\n  image_size: 30\n")
    out = mlsys(tmp_path, "prepare")
    assert "data.image_size = 30" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "data").exists()


def test_failing_stage_ends_its_run_failed(tmp_path):
    import mlflow

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")          # marks the project root
    out = mlsys(tmp_path, "evaluate", "model1")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "models/seed0/model1.pt does not exist; it is made by the train-model1@0 stage" in out.stderr
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mlsys").experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("evaluate-model1@0", "FAILED")]
    debug = mlsys(tmp_path, "--debug", "evaluate", "model1")
    assert "Traceback" in debug.stderr


def test_paper_command_sets_every_authors_choice_and_validates(tmp_path):
    import shlex

    import yaml

    from mlsys.params import Params, _build
    from mlsys.presets import PAPER, with_overrides

    (tmp_path / "fold_2.zip").write_bytes(b"")
    out = mlsys(tmp_path, "--params", str(ROOT / "params.yaml"), "paper", "fold_2.zip", "--dry-run")
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout.strip())
    assert argv[1:5] == ["exp", "run", "-n", "paper"] and argv[0].endswith("dvc")
    sets = dict(a.split("=", 1) for a in argv[6::2])
    assert set(PAPER) | {"data.pannuke_path", "data.protocol"} == set(sets) and sets["data.protocol"] == "pooled"
    assert sets["model.variant"] == "original" and sets["train.keep"] == "best" and sets["data.split"] == "[6, 1, 2]"
    assert sets["data.pannuke_path"] == str(tmp_path / "fold_2.zip")
    raw = with_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()),
                         {k: yaml.safe_load(v) for k, v in sets.items()})
    p = _build(Params, raw, "").validate()                   # the preset is a valid configuration
    assert (p.model.base, p.evaluate.attack.steps, p.augment.method1.steps) == (64, 100, 100)
    missing = mlsys(tmp_path, "paper", "nowhere.zip", "--dry-run")
    assert missing.returncode == 2 and "nowhere.zip does not exist" in missing.stderr


@pytest.mark.parametrize("split", [1, 2, 3])
def test_paper_command_runs_the_official_protocol(tmp_path, split):
    """`mlsys paper --official F1 F2 F3 --split N`: the preset on PanNuke's three folds, as the
    DVC experiment paper-official-N; the settings make a valid configuration."""
    import shlex

    import yaml

    from mlsys.params import OFFICIAL_SPLITS, Params, _build
    from mlsys.presets import PAPER, POOLED_ONLY, with_overrides

    for k in (1, 2, 3):
        (tmp_path / f"fold_{k}.zip").write_bytes(b"")
    folds = [f"fold_{k}.zip" for k in (1, 2, 3)]
    out = mlsys(tmp_path, "--params", str(ROOT / "params.yaml"), "paper", "--official", *folds, "--split", str(split),
                "--dry-run")
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout.strip())
    assert argv[1:5] == ["exp", "run", "-n", f"paper-official-{split}"]
    sets = dict(a.split("=", 1) for a in argv[6::2])
    assert set(sets) == (set(PAPER) - set(POOLED_ONLY)) | {"data.protocol", "data.official_split", "data.pannuke_folds"}
    raw = with_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()),
                         {k: yaml.safe_load(v) for k, v in sets.items()})
    p = _build(Params, raw, "").validate()
    assert (p.data.protocol, p.data.official_split, p.data.source) == ("official", split, "pannuke")
    assert p.data.pannuke_folds == [str(tmp_path / f) for f in folds] and split in OFFICIAL_SPLITS
    one = mlsys(tmp_path, "paper", "--official", ".", "--dry-run")      # one folder holding all three
    assert one.returncode == 0 and f"data.pannuke_folds={json.dumps([str(tmp_path)])}" in shlex.split(one.stdout)[-1]


def test_paper_command_refuses_a_mixed_protocol(tmp_path):
    for k in (1, 2, 3):
        (tmp_path / f"fold_{k}.zip").write_bytes(b"")
    for args, message in [(["fold_1.zip", "fold_2.zip", "--official"], "--official needs PanNuke's three folds"),
                          (["fold_1.zip", "fold_2.zip", "fold_3.zip"], "3 paths given; the paper's protocol takes one"),
                          (["fold_2.zip", "--split", "2"], "--split picks one of the official protocol's splits"),
                          (["fold_1.zip", "fold_2.zip", "fold_3.zip", "--official", "--fold", "2"], "--fold picks"),
                          (["fold_1.zip", "gone.zip", "fold_3.zip", "--official"], "gone.zip does not exist")]:
        out = mlsys(tmp_path, "paper", *args, "--dry-run")
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, (args, out.stderr)
        assert out.stdout == ""
