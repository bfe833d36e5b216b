from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLSYS_PROGRESS", "0")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each
    os.environ["OMP_NUM_THREADS"] = "1"    # (two threads per worker fight over the cores, 2-50x slower)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of whole pipelines (minutes); the fast tier is "
                                       "`pytest -m 'not slow'`")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n N --dist loadgroup --no-loadscope-reorder`` (make test): the tests of
    one module stay on one worker, so module fixtures run once; every test reading the
    session's micro ``pipeline`` shares one worker too, so that pipeline runs once, while the
    other workers take the rest. Groups are handed out in the order of their first test, so
    the longest go first (the pipeline's, then the other end-to-end modules) and the short
    ones fill the gaps at the end, rather than a long one starting last."""
    def group(item) -> str:
        return "pipeline" if "pipeline" in getattr(item, "fixturenames", ()) else item.module.__name__

    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    items.sort(key=lambda item: (group(item) != "pipeline", item.get_closest_marker("slow") is None))


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """A micro copy of the repository after one `dvc repro` (run once per session):
    (repo, the CompletedProcess of that repro). Tests must not change it: work on
    ``micro.clone(repo, ...)`` instead."""
    from micro import MICRO, PIPELINE_SEEDS, make_repo, merge, run

    repo = make_repo(tmp_path_factory.mktemp("repo"), merge(json.loads(json.dumps(MICRO)), {"seeds": PIPELINE_SEEDS}))
    return repo, run(repo, "dvc", "repro")


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory) -> Path:
    """Where tests keep what a person should look at (screenshots): $MLSYS_TEST_ARTIFACTS,
    else a pytest temporary folder."""
    path = Path(os.environ["MLSYS_TEST_ARTIFACTS"]) if os.environ.get("MLSYS_TEST_ARTIFACTS") \
        else tmp_path_factory.mktemp("artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions on a shared 2-core machine run far faster on one thread
    (two threads fighting over one busy core were up to 50x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

