"""More than one process, for real: torchrun with gloo on this CPU, shards merged, a rank killed.

* 2-process DDP training (`dvc repro` launching torchrun from ``distributed.nproc.train``)
  ends with the weights of 1 process with the same global batch, within 1e-5
  (dropout 0: dropout masks are drawn per rank; measured difference ~1e-7);
* method two and evaluation, split into ``--shard i/n`` processes or torchrun ranks and
  merged, are byte-for-byte / number-for-number the single-process outputs of the
  session's micro pipeline;
* one MLflow run per stage invocation however many processes;
* SIGKILL of one rank ends the stage with an error, its run closed, no process left;
  the next run resumes every rank from rank 0's checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from micro import MICRO, clone, env_for, make_repo, merge, run, runs_of
from mlsys.model import build_model
from mlsys.params import load_params

MLSYS = (sys.executable, "-m", "mlsys")


def with_params(repo: Path, name: str, overrides: dict) -> str:
    """A copy of the repo's params.yaml with ``overrides``, for `mlsys --params`."""
    params = merge(yaml.safe_load((repo / "params.yaml").read_text()), overrides)
    (repo / name).write_text(yaml.safe_dump(params))
    return name


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def metrics(path: Path) -> dict:
    out = json.loads(path.read_text())
    out.pop("mlflow_run_id")
    return out


@pytest.mark.slow
# --------------------------------------------------------------------------- DDP training
def test_two_process_ddp_training_matches_one_process(tmp_path):
    repo = make_repo(tmp_path / "repo", merge(json.loads(json.dumps(MICRO)), {
        "model": {"dropout": 0.0}, "distributed": {"nproc": {"train": 2}}}))
    env = env_for(repo)
    run(repo, *MLSYS, "prepare", env=env)
    one = with_params(repo, "one.yaml", {"distributed": {"nproc": {"train": 1}}})
    t0 = time.monotonic()
    run(repo, *MLSYS, "--params", one, "train", "model1", env=env)
    t1 = time.monotonic()
    single = state_dict(repo / "models/seed0/model1.pt")
    (repo / "models/seed0/model1.pt").unlink()

    out = run(repo, "dvc", "repro", "train-model1@0", env=env)   # params.yaml: 2 processes
    t2 = time.monotonic()
    print(f"\nmicro training, 2 epochs on 18 images: 1 process {t1 - t0:.1f} s, "
          f"2 processes (dvc repro, torchrun) {t2 - t1:.1f} s")
    assert "--nproc-per-node=2" in out.stdout + out.stderr, "the stage was launched under torchrun"
    double = state_dict(repo / "models/seed0/model1.pt")
    assert single.keys() == double.keys()
    worst = max(float((single[k] - double[k]).abs().max()) for k in single)
    assert worst < 1e-5, f"2-process weights differ from 1-process by {worst}"
    # "within 1e-5" says something only if training moved the weights far beyond it (a stage
    # that saved its initial weights would pass the comparison above): ~0.02 measured
    torch.manual_seed(0)  # the train stage's initialisation of seed 0
    init = build_model(load_params(repo / "params.yaml").model).state_dict()
    moved = max(float((single[k] - init[k]).abs().max()) for k in single)
    assert moved > 100 * 1e-5, f"training moved the weights by {moved} only"

    _, runs = runs_of(repo)
    train = [r for r in runs if r.info.run_name == "train-model1@0"]
    assert len(train) == 2, [r.info.run_name for r in runs]  # one per invocation, not per rank
    ddp = next(r for r in train if r.data.params["train.processes"] == "2")
    assert ddp.info.status == "FINISHED" and ddp.data.params["train.batch_per_process"] == "3"
    assert ddp.data.tags.get("mlflow.parentRunId"), "the torchrun stage is a child of the dvc pipeline run"
    assert len(client_history(ddp.info.run_id, repo)) == 2, "each epoch logged once (rank 0)"
    assert not (repo / "checkpoints/seed0/model1.pt").exists()


def client_history(run_id: str, repo: Path):
    client, _ = runs_of(repo)
    return client.get_metric_history(run_id, "train/loss")


@pytest.mark.slow
# --------------------------------------------------------------------------- shards
def test_shards_and_ranks_merge_into_the_single_process_outputs(pipeline, tmp_path):
    ref = pipeline[0]
    repo = clone(ref, tmp_path / "sharded")
    env = env_for(repo)
    (repo / "data/seed0/method2.h5").unlink()
    (repo / "metrics/eval/seed0/model2.json").unlink()

    # independent processes, running at the same time, then the merge
    procs = [subprocess.Popen([*MLSYS, "augment", "method2", "--shard", f"{i}/2"], cwd=repo, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (1, 0)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stdout.read()
        p.stdout.close()
    assert not (repo / "data/seed0/method2.h5").exists(), "a shard alone writes no dataset"
    assert len(list((repo / "data/seed0/.method2.h5.partial").glob("*.npz"))) == 3  # 18 images, chunks of 8
    merged = run(repo, *MLSYS, "augment", "method2", env=env)
    assert "resumed 18 of 18 images" in merged.stdout
    assert (repo / "data/seed0/method2.h5").read_bytes() == (ref / "data/seed0/method2.h5").read_bytes()
    assert not (repo / "data/seed0/.method2.h5.partial").exists()

    for i in (2, 0, 1):
        run(repo, *MLSYS, "evaluate", "model2", "--shard", f"{i}/3", env=env)
    run(repo, *MLSYS, "evaluate", "model2", env=env)
    assert metrics(repo / "metrics/eval/seed0/model2.json") == metrics(ref / "metrics/eval/seed0/model2.json")

    # torchrun ranks (gloo): rank 0 gathers the chunks and writes
    two = with_params(repo, "two.yaml", {"distributed": {"nproc": {"augment": 2, "evaluate": 2}}})
    (repo / "data/seed0/method2.h5").unlink()
    run(repo, *MLSYS, "--params", two, "augment", "method2", env=env)
    assert (repo / "data/seed0/method2.h5").read_bytes() == (ref / "data/seed0/method2.h5").read_bytes()
    run(repo, *MLSYS, "--params", two, "evaluate", "model2", env=env)
    assert metrics(repo / "metrics/eval/seed0/model2.json") == metrics(ref / "metrics/eval/seed0/model2.json")

    _, runs = runs_of(repo)  # the clone's store is new: shards log nothing, each merge one run
    assert sorted(r.info.run_name for r in runs) == ["augment-method2@0"] * 2 + ["evaluate-model2@0"] * 2
    assert all(r.info.status == "FINISHED" for r in runs)
    # DVC sees the very output it recorded (evaluate's metrics differ only in their run id)
    assert run(repo, "dvc", "status", "augment-method2@0", env=env).stdout.strip() == \
        "Data and pipelines are up to date."


def test_bad_shard_and_batch_split_are_one_line_errors(tmp_path):
    env = env_for(Path(__file__).resolve().parents[1])
    for shard in ("2/2", "x", "1/0", "1/2/3"):
        out = subprocess.run([*MLSYS, "augment", "method2", "--shard", shard], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert f"--shard '{shard}' is invalid; expected i/n with 0 <= i < n" in out.stderr
    (tmp_path / "params.yaml").write_text("train: {batch_size: 18}\ndistributed: {nproc: {train: 4}}\n")
    out = subprocess.run([*MLSYS, "train", "model1"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip() == (
        "mlsys train: error: params: train.batch_size = 18 is invalid; expected a multiple of "
        "distributed.nproc.train = 4 (the global batch is split evenly)")


# --------------------------------------------------------------------------- a dead rank
def _descendants(pid: int) -> list[int]:
    """Live (not zombie) processes below ``pid``."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(") ", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parent[int(d.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [c for c, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def _rank_pids(pid: int, rank: int) -> list[int]:
    """torchrun workers of ``rank`` below ``pid``."""
    found = []
    for child in _descendants(pid):
        try:
            environ = set((Path("/proc") / str(child) / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and any(e.startswith(b"TORCHELASTIC_RUN_ID=") for e in environ):
            found.append(child)
    return found


def _still_alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if (Path("/proc") / str(pid) / "stat").read_text().rsplit(") ", 1)[1][0] != "Z":
                out.append(pid)
        except OSError:
            pass
    return out


@pytest.mark.slow
def test_killing_one_rank_fails_the_stage_cleanly(tmp_path):
    # 400 micro epochs take ~15 s with 2 processes here (~0.04 s each): the kill, right after
    # epoch 1's checkpoint, lands mid-training with a wide margin; the re-run finishes them
    repo = make_repo(tmp_path / "repo", merge(json.loads(json.dumps(MICRO)), {
        "train": {"epochs": 400}, "distributed": {"nproc": {"train": 2}, "timeout_s": 60}}))
    env = env_for(repo)
    proc = subprocess.Popen(["dvc", "repro", "train-model1@0"], cwd=repo, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (repo / "checkpoints/seed0/model1.pt").exists():  # training is under way (epoch 1 done)
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the 2-process training never finished an epoch"
            time.sleep(0.1)
        victims = _rank_pids(proc.pid, 1)
        assert len(victims) == 1, victims
        tree = _descendants(proc.pid)  # dvc, the stage's shell, torchrun, its two workers
        os.kill(victims[0], signal.SIGKILL)
        killed = time.monotonic()
        output = proc.communicate(timeout=120)[0]  # no hang: torchrun stops rank 0, the stage fails
        waited, code = time.monotonic() - killed, proc.returncode
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
    _, runs = runs_of(repo)
    status = {r.info.run_name: r.info.status for r in runs}
    print(f"\nthe stage ended {waited:.1f} s after rank 1 was killed (exit status {code}; run {status})")
    assert code != 0 and "failed to reproduce 'train-model1@0'" in output, output[-3000:]
    assert not (repo / "models/seed0/model1.pt").exists()
    deadline = time.monotonic() + 30
    while _still_alive(tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _still_alive(tree), "every process of the stage is gone"
    assert status["train-model1@0"] in ("KILLED", "FAILED"), status
    assert "RUNNING" not in status.values(), status

    # the same stage again: both ranks resume from rank 0's checkpoint and finish
    assert (repo / "checkpoints/seed0/model1.pt").exists()
    again = run(repo, "dvc", "repro", "train-model1@0", env=env)
    assert "train: resumed from checkpoints/seed0/model1.pt after epoch" in again.stdout + again.stderr
    assert "(all 2 processes)" in again.stdout + again.stderr
    assert (repo / "models/seed0/model1.pt").exists() and not (repo / "checkpoints/seed0/model1.pt").exists()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", "-s"]))
