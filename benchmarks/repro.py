"""Where a real `dvc repro` spends its time: per stage group, start-up, compute and tracking.

    python benchmarks/repro.py                 # `dvc repro --force` here, then the table
    python benchmarks/repro.py --no-run        # the table of the latest pipeline run only
    python benchmarks/repro.py --json benchmarks/results/repro_default_<cpu>.json

Runs the pipeline of this checkout as `make repro` does (progress bars off), timing it from
outside, then reads the stages' MLflow runs of that pipeline (the parent run of the
invocation): per stage
  start-up  process start -> its MLflow run open: interpreter, imports, MLflow set-up
            (metric timing/startup_s, logged by mlsys.tracking.stage_run)
  compute   the stage's own work (metric timing/compute_s: training, the attacks, the
            search, the evaluation; per-epoch and per-chunk logging included)
  tracking  the rest of the run: params, datasets, figures, models, the registry
  other     the wall time not inside any stage process: DVC's own work (hashing,
            caching, lock file) and the processes' exit.
Stages are grouped by job (prepare, train-model1, augment-method1, ...). Prints the machine
(CPU model and its bf16 support) with the numbers; writes JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout


def group_of(stage: str) -> str:
    """train-model2@1 -> train-model2; prepare -> prepare."""
    return stage.split("@", 1)[0]


def pipeline_stages(repo: Path, experiment: str) -> tuple[str, list[dict]]:
    """(the latest pipeline run's name, one dict per stage run of it: stage, start, end (s),
    startup_s, compute_s)."""
    os.chdir(repo)
    from mlflow.tracking import MlflowClient

    from mlsys import tracking

    tracking.setup(experiment)
    client = MlflowClient()
    exp = client.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME", experiment))
    parents = client.search_runs([exp.experiment_id], "tags.`mlsys.kind` = 'pipeline'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise SystemExit("repro.py: no pipeline run in the MLflow store; run `dvc repro` first")
    parent = parents[0]
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                              max_results=1000)
    stages = []
    for r in runs:
        m = r.data.metrics
        stages.append({"stage": r.info.run_name, "status": r.info.status,
                       "start": r.info.start_time / 1e3, "end": (r.info.end_time or r.info.start_time) / 1e3,
                       "startup_s": m.get("timing/startup_s"), "compute_s": m.get("timing/compute_s")})
    return parent.info.run_name, sorted(stages, key=lambda s: s["start"])


def table(stages: list[dict], wall: float | None) -> dict:
    """Sums per stage group and in all; ``wall``: the measured wall time of the whole repro."""
    groups: dict[str, dict] = defaultdict(lambda: {"stages": 0, "startup_s": 0.0, "compute_s": 0.0,
                                                   "tracking_s": 0.0, "total_s": 0.0})
    for s in stages:
        run = s["end"] - s["start"]
        startup = s["startup_s"] or 0.0
        compute = min(s["compute_s"] or 0.0, run)
        g = groups[group_of(s["stage"])]
        g["stages"] += 1
        g["startup_s"] += startup
        g["compute_s"] += compute
        g["tracking_s"] += run - compute
        g["total_s"] += startup + run
    total = {k: sum(g[k] for g in groups.values()) for k in ("stages", "startup_s", "compute_s", "tracking_s",
                                                              "total_s")}
    if wall is not None:
        total["other_s"] = wall - total["total_s"]
        total["wall_s"] = wall
    return {"groups": dict(groups), "total": total}


def show(result: dict, machine: str, name: str) -> None:
    print(f"# {name} on {machine}")
    print(f"{'stage group':20s} {'n':>3s} {'start-up':>9s} {'compute':>9s} {'tracking':>9s} {'total':>9s}")
    rows = list(result["groups"].items()) + [("all stages", result["total"])]
    for key, g in rows:
        print(f"{key:20s} {g['stages']:3d} {g['startup_s']:8.1f}s {g['compute_s']:8.1f}s "
              f"{g['tracking_s']:8.1f}s {g['total_s']:8.1f}s")
    t = result["total"]
    if "wall_s" in t:
        print(f"wall {t['wall_s']:.1f} s ({t['wall_s'] / 60:.1f} min); outside the stages' processes "
              f"(DVC, exits): {t['other_s']:.1f} s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", type=Path, default=ROOT, help="the checkout to run (default: this one)")
    ap.add_argument("--no-run", action="store_true", help="only tabulate the latest pipeline run")
    ap.add_argument("--no-force", action="store_true", help="`dvc repro` without --force (cached stages skip)")
    ap.add_argument("--experiment", default="mlsys", help="MLflow experiment (tracking.experiment)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args(argv)
    repo = args.repo.resolve()
    wall = None
    if not args.no_run:
        env = {**os.environ, "MLSYS_PROGRESS": "0", "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
        dvc = Path(sys.executable).with_name("dvc")  # this interpreter's DVC, whatever PATH holds
        cmd = [str(dvc) if dvc.exists() else "dvc", "repro"] + ([] if args.no_force else ["--force"])
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=repo, env=env, check=True)
        wall = time.perf_counter() - t0
    import torch

    from mlsys import hardware

    name, stages = pipeline_stages(repo, args.experiment)
    result = table(stages, wall)
    machine = f"{hardware.machine()}; {hardware.describe(torch.device('cpu'))}"
    show(result, machine, name)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "pipeline": name, **result, "stages": stages},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
