"""Where every stage reads and writes, relative to the repository root (dvc.yaml spells
the same paths; tests/test_layout.py checks that they agree).

Data are prepared once; everything a training seed produces lives in that seed's folder
under each kind (``models/seed1/model2.pt``, ``metrics/eval/seed1/model2.json``), so the
report stage can depend on the whole kind folder and read every seed of ``seeds``.
"""
from __future__ import annotations

CLEAN = "data/clean.h5"
REPORT = "reports"
REPORT_METRICS = "metrics/report.json"
REPORT_PLOTS = "plots/report"


def dataset(name: str, seed: int) -> str:
    """A training set built with seed ``seed``'s model 1 (``method1``/``method2``), or the clean data."""
    return CLEAN if name == "clean" else f"data/seed{seed}/{name}.h5"


def transfer(method: str, seed: int) -> str:
    """The TEST split perturbed by ``method`` with seed ``seed``'s model 1, as its training set
    was: every model is evaluated on it (the report's cross-evaluation)."""
    return f"data/seed{seed}/{method}_test.h5"


def weights(model: str, seed: int) -> str:
    return f"models/seed{seed}/{model}.pt"


def checkpoint(model: str, seed: int) -> str:
    return f"checkpoints/seed{seed}/{model}.pt"


def train_metrics(model: str, seed: int) -> str:
    return f"metrics/train/seed{seed}/{model}.json"


def train_plot(model: str, seed: int) -> str:
    return f"plots/train/seed{seed}/{model}.csv"


def augment_metrics(method: str, seed: int) -> str:
    return f"metrics/augment/seed{seed}/{method}.json"


def eval_metrics(model: str, seed: int) -> str:
    return f"metrics/eval/seed{seed}/{model}.json"


def eval_figures(model: str, seed: int) -> str:
    return f"plots/eval/seed{seed}/{model}"


def stage_name(job: str, name: str | None = None, seed: int | None = None) -> str:
    """The DVC stage name, which is also the MLflow run name: ``train-model2@1``,
    ``augment-method1@0``, ``prepare``, ``report``."""
    return job if name is None else f"{job}-{name}@{seed}"
