"""``python -m mlsys <command>``: parses arguments, calls the stage's ``main`` in its job
module (prepare: data.py, train: train.py, augment: augment.py, evaluate: evaluate.py,
report: report.py) and turns errors into one line and an exit code.

Bad input ends with one line on stderr and exit status 2; ``--debug`` (or MLSYS_DEBUG=1)
shows the traceback. SIGTERM ends a stage with status 143 and Ctrl-C with 130, its MLflow
run KILLED.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

# --------------------------------------------------------------------------- stages
# Each stage's code is in its job module, read top to bottom there; these only pass arguments.
def _seed(args, p) -> int:
    return p.seeds[0] if args.seed is None else args.seed


def cmd_prepare(args, p) -> None:
    from . import data

    data.main(p)


def cmd_train(args, p) -> None:
    from . import train

    train.main(p, args.model, _seed(args, p), args.argv)


def cmd_augment(args, p) -> None:
    from . import augment

    augment.main(p, args.method, _seed(args, p), args.argv, args.shard)


def cmd_evaluate(args, p) -> None:
    from . import evaluate

    evaluate.main(p, args.model, _seed(args, p), args.argv, args.shard)


def cmd_report(args, p) -> None:
    from . import report

    report.main(p)


def cmd_compare(args, p) -> None:
    from . import report

    print(report.compare(p, args.parent))


def cmd_paper(args, p) -> None:
    """`dvc exp run` of the paper's configuration (params.PAPER) on your PanNuke fold."""
    import json
    import shlex

    from .data import DataError
    from .params import PAPER

    if not Path(args.pannuke).exists():
        raise DataError(f"{args.pannuke} does not exist; expected your PanNuke fold zip (e.g. fold_2.zip) "
                        "or its unpacked 'Fold 2' folder")
    sets = {**PAPER, "data.pannuke_path": str(Path(args.pannuke).resolve()), "data.fold": args.fold}
    cmd = [str(Path(sys.executable).with_name("dvc")), "exp", "run", "-n", args.name]
    for key, value in sets.items():
        cmd += ["-S", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    print(shlex.join(cmd), flush=True)
    if not args.dry_run:
        os.execv(cmd[0], cmd)


def cmd_ui(args, p) -> None:
    from . import tracking

    uri = tracking.tracking_uri()
    exp_id = tracking.setup(p.tracking.experiment)
    if uri.startswith(("http://", "https://")):  # a tracking server is its own UI
        print(f"training runs: {uri.rstrip('/')}/#/experiments/{exp_id}/runs?workflowType=machine_learning")
        return
    url = f"http://{args.host}:{args.port}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    print(f"MLflow UI on {tracking.redact(uri)}\ntraining runs: {url}", flush=True)
    _exec_mlflow("ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port))


def cmd_server(args, p) -> None:
    from . import tracking

    home = tracking.repo_root() / "mlflow-server"
    backend = args.backend_store_uri or f"sqlite:///{home / 'mlflow.db'}"
    artifacts = args.artifacts_destination or str(home / "artifacts")
    if backend.startswith("sqlite:///"):
        Path(backend[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    url = f"http://{args.host}:{args.port}"
    print(f"MLflow tracking server on {tracking.redact(backend)}, artifacts in {artifacts}\n"
          f"log to it with: export MLFLOW_TRACKING_URI={url}\nUI: {url}", flush=True)
    _exec_mlflow("server", "--backend-store-uri", backend, "--artifacts-destination", artifacts, "--serve-artifacts",
                 "--host", args.host, "--port", str(args.port))


def _exec_mlflow(*argv: str) -> None:
    """Replace this process by the ``mlflow`` CLI of this environment, with one worker and
    no job runner: 2 processes and ~0.5 GiB instead of 15 and ~3 GiB."""
    os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    os.execv(mlflow, [mlflow, *argv, "--workers", "1"])


def cmd_runs(args, p) -> None:
    from . import tracking

    swept = tracking.sweep(p.tracking.experiment, args.older_than, args.dry_run)
    for run, reason in swept:
        print(f"{'would mark' if args.dry_run else 'marked'} {run.info.run_id} "
              f"({run.info.run_name}) FAILED: {reason}")
    print(f"{len(swept)} run(s) left RUNNING by a crash{' (dry run)' if args.dry_run else ''}")


# --------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    from .params import METHODS, MODELS

    ap = argparse.ArgumentParser(prog="mlsys", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="build data/clean.h5 (synthetic default or your PanNuke fold)")
    seed_help = "training seed (default: the first of `seeds` in params.yaml)"
    shard_help = ("compute only shard i of n (chunks j with j mod n == i) and keep them for the merge: "
                  "a later run without --shard merges every shard into the same output as one process")
    s = sub.add_parser("train", help="train one of the four models")
    s.add_argument("model", choices=list(MODELS))
    s.add_argument("--seed", type=int, help=seed_help)
    s = sub.add_parser("augment", help="build a method-one or method-two training set with model 1")
    s.add_argument("method", choices=list(METHODS))
    s.add_argument("--seed", type=int, help=seed_help)
    s.add_argument("--shard", metavar="I/N", help=shard_help)
    s = sub.add_parser("evaluate", help="evaluate one model on the test split, clean and under attack")
    s.add_argument("model", choices=list(MODELS))
    s.add_argument("--seed", type=int, help=seed_help)
    s.add_argument("--shard", metavar="I/N", help=shard_help)
    sub.add_parser("report", help="write Tables 1 and 2 and the figures to reports/")
    s = sub.add_parser("compare", help="print Tables 1 and 2 from the MLflow runs")
    s.add_argument("--parent", help="pipeline parent run id (default: the latest pipeline)")
    s = sub.add_parser("paper", help="run the paper's experiment (the authors' settings) on your PanNuke fold "
                                     "as the DVC experiment `paper`")
    s.add_argument("pannuke", help="your PanNuke fold: the downloaded zip (fold_2.zip) or its unpacked folder")
    s.add_argument("--fold", type=int, default=2, help="fold number inside it (default: 2, as the paper)")
    s.add_argument("--name", default="paper", help="DVC experiment name (default: paper)")
    s.add_argument("--dry-run", action="store_true", help="print the `dvc exp run` command, run nothing")
    ui = sub.add_parser("ui", help="open the MLflow UI on the project's tracking store")
    s = sub.add_parser("server", help="start an MLflow tracking server (database backend, served artifacts)")
    for listener in (ui, s):
        listener.add_argument("--host", default="127.0.0.1",
                              help="address to bind (default: 127.0.0.1, this machine only)")
        listener.add_argument("--port", type=int, default=5000)
    s.add_argument("--backend-store-uri",
                   help="SQLAlchemy database URI (default: sqlite:///<repo>/mlflow-server/mlflow.db)")
    s.add_argument("--artifacts-destination", help="where the server stores artifacts: a folder or s3://, gs://, ... "
                                                   "(default: <repo>/mlflow-server/artifacts)")
    s = sub.add_parser("runs", help="maintenance of the MLflow runs")
    r = s.add_subparsers(dest="action", required=True).add_parser(
        "sweep", help="mark runs left RUNNING by a crashed or killed stage as FAILED")
    r.add_argument("--older-than", type=float, default=24.0, metavar="HOURS",
                   help="also sweep runs whose process cannot be checked (another host) that are "
                        "older than this (default: 24)")
    r.add_argument("--dry-run", action="store_true", help="list the runs, change nothing")
    return ap


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "augment": cmd_augment, "evaluate": cmd_evaluate,
            "report": cmd_report, "compare": cmd_compare, "paper": cmd_paper, "ui": cmd_ui, "server": cmd_server,
            "runs": cmd_runs}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what torchrun re-runs (distributed.launch)
    debug = args.debug or os.environ.get("MLSYS_DEBUG") == "1"
    from .params import InputError, load_params

    try:
        p = load_params(args.params)
        COMMANDS[args.command](args, p)
    except (InputError, ConnectionError) as err:
        if debug:
            traceback.print_exc()
        print(f"mlsys {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the stage's run is already ended KILLED
        print(f"mlsys {args.command}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as err:
        dist = sys.modules.get("torch.distributed")
        if dist is None or not isinstance(err, dist.DistError):
            raise
        if debug:
            traceback.print_exc()
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"mlsys {args.command}: error: another process of this torchrun job failed or is unreachable "
              f"({first[:200]})", file=sys.stderr)
        return 1
    except BaseException as err:
        tracking = sys.modules.get("mlsys.tracking")
        if tracking is None or not isinstance(err, tracking.StageKilled):
            raise
        print(f"mlsys {args.command}: {err}; stopped", file=sys.stderr)  # SIGTERM, run ended KILLED
        return 143
    return 0
