"""``python -m mlsys <command>`` (``bin/mlsys``): the user's command line. The pipeline's
stages each run their own module (``python -m mlsys.train ...``, as dvc.yaml does); their
commands here only pass arguments to those modules' ``main``. The rest: the paper preset,
the MLflow UI and server, run maintenance, and ``check`` of the whole parameter file.

Bad input ends with one line on stderr and exit status 2 (mlsys.entry); ``--debug`` (or
MLSYS_DEBUG=1) shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import entry

# --------------------------------------------------------------------------- stages
# Each stage's code is in its job module, read top to bottom there; these only pass arguments.
def cmd_prepare(args, p) -> None:
    from . import prepare

    prepare.main(p)


def cmd_train(args, p) -> None:
    from .params import BASELINES

    if args.model in BASELINES:  # the adversarial-training baselines: their own stage module
        from . import adversarial

        adversarial.main(p, args.model, entry.seed_of(args, p), args.relaunch)
    else:
        from . import train

        train.main(p, args.model, entry.seed_of(args, p), args.relaunch)


def cmd_augment(args, p) -> None:
    import importlib

    from . import augment

    method = importlib.import_module(f"mlsys.{args.method}").METHOD
    augment.main(p, method, entry.seed_of(args, p), args.relaunch, args.shard)


def cmd_evaluate(args, p) -> None:
    from . import evaluate

    evaluate.main(p, args.model, entry.seed_of(args, p), args.relaunch, args.shard)


def cmd_robust(args, p) -> None:
    """The field's protocol on a model that is not ours (mlsys/robust_eval.py): its flags are
    read here, so that a bad value is one line like any other bad input."""
    from . import robust_eval
    from .params import ParamsError

    def listed(flag: str, text: str | None, kind):
        if text is None:
            return None
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ParamsError(f"{flag} {text!r} is not a comma-separated list of {kind.__name__}s") from None

    steps = listed("--steps", args.steps, int)
    if steps is not None and len(steps) != 1:
        raise ParamsError(f"--steps {args.steps!r} is not one integer")
    robust_eval.main(p, args.model, args.data, args.weights, args.split, listed("--attacks", args.attacks, str),
                     listed("--radii", args.radii, float), steps and steps[0], args.out)


def cmd_report(args, p) -> None:
    from . import report

    report.main(p)


def cmd_compare(args, p) -> None:
    from . import report

    print(report.compare(p, args.parent))


def cmd_check(args, p) -> None:
    """Every setting of the parameter file, as each stage will check its own when it runs
    (the attack names, method two's choices, the model's variant), so that a typo ends
    ``make repro`` before the first stage rather than in the evaluate stage."""
    import dataclasses

    from . import attacks, method2, model, robust

    model.build_model(dataclasses.replace(p.model, base=1, depth=1))  # a tiny one: only its checks matter
    attacks.check_mode(p.evaluate.attack.mode, "evaluate.attack.mode")
    attacks.check_mode(p.augment.method1.mode, "augment.method1.mode")
    method2.check(p.augment.method2)
    if p.evaluate.robust.enabled:
        robust.check(p.evaluate.robust)
    print(f"{args.params}: ok")


def cmd_paper(args, p) -> None:
    """`dvc exp run` of the paper's configuration (presets.PAPER) on your PanNuke data: one fold
    split at random as the authors did (``data.protocol: pooled``), or with ``--official`` the
    three folds, train, valid and test each a whole fold (``--split``, mlsys.params.OFFICIAL_SPLITS)."""
    import json
    import shlex

    from .data import DataError
    from .presets import PAPER, POOLED_ONLY

    for path in args.pannuke:
        if not Path(path).exists():
            raise DataError(f"{path} does not exist; expected your PanNuke fold zip (e.g. fold_2.zip) "
                            "or its unpacked 'Fold 2' folder")
    if args.official and args.fold is not None:
        raise DataError("--fold picks the pooled protocol's fold; --official uses all three (pick a split with --split)")
    if not args.official and args.split is not None:
        raise DataError("--split picks one of the official protocol's splits; add --official")
    if args.official:
        split = args.split or 1
        if len(args.pannuke) not in (1, 3):
            raise DataError(f"--official needs PanNuke's three folds (fold 1, 2, 3: zips or folders) or one folder "
                            f"holding all three; got {len(args.pannuke)} paths")
        sets = {k: v for k, v in PAPER.items() if k not in POOLED_ONLY}
        sets.update({"data.protocol": "official", "data.official_split": split,
                     "data.pannuke_folds": [str(Path(f).resolve()) for f in args.pannuke]})
        name = args.name or f"paper-official-{split}"
    else:
        if len(args.pannuke) != 1:
            raise DataError(f"{len(args.pannuke)} paths given; the paper's protocol takes one fold "
                            "(for PanNuke's three folds add --official)")
        sets = {**PAPER, "data.protocol": "pooled", "data.pannuke_path": str(Path(args.pannuke[0]).resolve()),
                "data.fold": args.fold or 2}
        name = args.name or "paper"
    cmd = [str(Path(sys.executable).with_name("dvc")), "exp", "run", "-n", name]
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
    from .params import EXPERIMENT, METHODS, OFFICIAL_SPLITS

    ap = entry.parser("mlsys", "mlsys: robust U-Net segmentation of histology (DVC stages, MLflow runs).")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="build data/clean.h5 (synthetic default or your PanNuke fold)")
    seed_help, shard_help = entry.SEED_HELP, entry.SHARD_HELP
    s = sub.add_parser("train", help="train one of the four models or a baseline (pgdat, trades)")
    s.add_argument("model", choices=list(EXPERIMENT))
    s.add_argument("--seed", type=int, help=seed_help)
    s = sub.add_parser("augment", help="build a method-one or method-two training set with model 1")
    s.add_argument("method", choices=list(METHODS))
    s.add_argument("--seed", type=int, help=seed_help)
    s.add_argument("--shard", metavar="I/N", help=shard_help)
    s = sub.add_parser("evaluate", help="evaluate one model on the test split, clean and under attack")
    s.add_argument("model", choices=list(EXPERIMENT))
    s.add_argument("--seed", type=int, help=seed_help)
    s.add_argument("--shard", metavar="I/N", help=shard_help)
    s = sub.add_parser("robust", help="the robustness protocol (evaluate.robust) on any model and data "
                                      "(docs/robustness.md, \"Evaluating your own model\")")
    s.add_argument("model", help="an MLflow model URI (runs:/..., models:/mlsys-unet@champion), a TorchScript "
                                 ".pt file, a torch.export .pt2 file, or module:function with --weights")
    s.add_argument("data", help="an HDF5 file of mlsys.data, or a folder with images/*.png (RGB) and "
                                "masks/*.png (class ids) of the same names")
    s.add_argument("--weights", metavar="FILE", help="state_dict for module:function (torch.load weights_only)")
    s.add_argument("--split", default="test", help="split of an HDF5 file (default: test)")
    s.add_argument("--attacks", help="comma-separated, of mlsys.robust.ATTACKS (default: evaluate.robust.attacks)")
    s.add_argument("--radii", help="comma-separated L-inf radii on the 0..255 scale (default: evaluate.robust.radii)")
    s.add_argument("--steps", help="iterations of each attack (default: evaluate.robust.steps)")
    s.add_argument("--out", help="output folder (default: robust/<name of the model>/)")
    sub.add_parser("report", help="write Tables 1 and 2 and the figures to reports/")
    sub.add_parser("check", help="check every setting of the parameter file, as the stages will")
    s = sub.add_parser("compare", help="print Tables 1 and 2 from the MLflow runs")
    s.add_argument("--parent", help="pipeline parent run id (default: the latest pipeline)")
    s = sub.add_parser("paper", help="run the paper's experiment (the authors' settings) on your PanNuke fold "
                                     "as the DVC experiment `paper`, or on the three folds with --official")
    s.add_argument("pannuke", nargs="+", help="your PanNuke fold: the downloaded zip (fold_2.zip) or its unpacked "
                                              "folder; with --official folds 1, 2 and 3, or one folder holding all three")
    s.add_argument("--fold", type=int, help="fold number inside it (default: 2, as the paper)")
    s.add_argument("--official", action="store_true",
                   help="PanNuke's official protocol: train, valid and test are whole folds (data.protocol: official)")
    s.add_argument("--split", type=int, choices=sorted(OFFICIAL_SPLITS),
                   help="with --official: " + "; ".join(f"{k} = train fold {a}, valid {b}, test {c}"
                                                        for k, (a, b, c) in OFFICIAL_SPLITS.items())
                        + " (CellViT's Fold-1..3; default: 1)")
    s.add_argument("--name", help="DVC experiment name (default: paper, or paper-official-<split> with --official)")
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
            "robust": cmd_robust, "report": cmd_report, "check": cmd_check, "compare": cmd_compare, "paper": cmd_paper, "ui": cmd_ui, "server": cmd_server,
            "runs": cmd_runs}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.relaunch = ["-m", "mlsys", *(sys.argv[1:] if argv is None else argv)]  # what torchrun re-runs
    from .params import load_params

    return entry.guarded(f"mlsys {args.command}", args.debug,
                         lambda: COMMANDS[args.command](args, load_params(args.params)))
