"""What MLflow records about data comes from the files themselves."""
from __future__ import annotations

import hashlib

import yaml


def test_dataset_digest_is_the_written_files_not_the_previous_lock(tmp_path, monkeypatch):
    """A rewritten file of the same path and size (method two with another eps keeps the HDF5
    size) must be logged with its new md5, although dvc.lock still names the old one."""
    import mlflow

    from mlsys import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    tracking.setup()  # this store and its experiment, not those an earlier test left set
    (tmp_path / "data").mkdir()
    old, new = b"a" * 64, b"b" * 64
    (tmp_path / "data/method2.h5").write_bytes(new)
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"augment-method2@0": {
        "outs": [{"path": "data/method2.h5", "md5": hashlib.md5(old).hexdigest(), "size": len(old)}]}}}))
    with mlflow.start_run() as run:
        digest = tracking.log_dataset(tmp_path / "data/method2.h5", "output")
    assert digest == hashlib.md5(new).hexdigest()
    logged = mlflow.get_run(run.info.run_id).inputs.dataset_inputs[0]
    assert {t.key: t.value for t in logged.tags}["dvc.md5"] == digest


def test_stage_runs_log_their_start_up_and_timed_parts(tmp_path, monkeypatch):
    """timing/startup_s (process start -> run open) and timing/compute_s (the timed block) land
    in the stage's run, as benchmarks/repro.py reads them; outside a run nothing is logged."""
    import time

    import mlflow

    from mlsys import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    with tracking.timed("compute"):  # no active run: must not start one
        pass
    assert mlflow.active_run() is None
    with tracking.stage_run("train-model1@0", {}) as run:
        with tracking.timed("compute"):
            time.sleep(0.05)
    metrics = mlflow.get_run(run.info.run_id).data.metrics
    age = tracking.process_age()
    assert age is None or 0 < metrics["timing/startup_s"] <= age
    assert 0.05 <= metrics["timing/compute_s"] < 5


def test_a_stop_signal_inside_a_store_write_waits_for_it(tmp_path, monkeypatch):
    """SIGTERM or Ctrl-C that lands while MLflow's code runs (a store write: interrupted, its
    SQLite transaction stayed open, the store locked, and the run could not be closed KILLED)
    takes effect as soon as that code returns: the write completes, then the stage stops and its
    run ends KILLED; the handlers are restored afterwards."""
    import signal
    import time

    import mlflow
    import pytest

    from mlsys import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    store = {"__name__": "mlflow.store.tracking.example"}  # frames of a module of MLflow's
    exec("def write(sig, done):\n    import os, time\n    os.kill(os.getpid(), sig)\n    time.sleep(0.3)\n"
         "    done.append(True)\n", store)
    before_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # a worker may ignore Ctrl-C
    try:
        before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)}
        for sig, stop in ((signal.SIGTERM, tracking.StageKilled), (signal.SIGINT, KeyboardInterrupt)):
            done: list[bool] = []
            t0 = time.monotonic()
            with pytest.raises(stop):
                with tracking.stage_run("train-model1@0", {}) as run:
                    store["write"](sig, done)
                    time.sleep(10)   # the stop comes here, ~0.05 s after the write returned
            assert done == [True], f"{sig.name} cut the store write short"
            assert time.monotonic() - t0 < 5
            assert mlflow.get_run(run.info.run_id).info.status == "KILLED"
            assert {s: signal.getsignal(s) for s in before} == before
    finally:
        signal.signal(signal.SIGINT, before_int)
