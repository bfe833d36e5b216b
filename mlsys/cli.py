"""``python -m mlsys <stage>``: thin stage entry points for dvc.yaml.

Each stage reads its sections of params.yaml, opens its MLflow run (tracking.py)
and calls the pure functions that do the work. Bad input ends with one line on
stderr and exit status 2; ``--debug`` (or MLSYS_DEBUG=1) shows the traceback.
SIGTERM ends a stage with status 143 and Ctrl-C with 130, its MLflow run KILLED.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

PATHS = {
    "clean": "data/clean.h5",
    "set": "data/{}.h5",
    "weights": "models/{}.pt",
    "checkpoint": "checkpoints/{}.pt",
    "train_metrics": "metrics/train/{}.json",
    "train_plot": "plots/train/{}.csv",
    "eval_metrics": "metrics/eval/{}.json",
    "eval_figures": "plots/eval/{}",
    "augment_metrics": "metrics/augment/{}.json",
    "report": "reports",
    "report_metrics": "metrics/report.json",
    "class_plot": "plots/report/per_class_dice.csv",
}


def _write_json(path: str, obj) -> None:
    from .data import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _method_tag(model: str) -> str:
    """Which augmentation methods a model's training sets come from ("clean" for model 1),
    so that filtering runs by ``tags.`mlsys.method``` finds a method's set and its models."""
    from .train import MODELS

    return "+".join(s for s in MODELS[model] if s != "clean") or "clean"


def _progress() -> bool:
    return os.environ.get("MLSYS_PROGRESS", "1") != "0"


# --------------------------------------------------------------------------- stages
def cmd_prepare(args, p) -> None:
    import numpy as np

    from . import data, figures, tracking
    from .params import CLASS_NAMES, section_dict

    with tracking.stage_run("prepare", {f"data.{k}": v for k, v in section_dict(p.data).items()},
                            p.tracking.experiment, {"mlsys.stage": "prepare"}):
        import mlflow

        sizes = data.prepare(p.data, PATHS["clean"], _progress())
        attrs = data.read_attrs(PATHS["clean"])
        counts = np.array(json.loads(attrs["class_pixel_counts"]), dtype=float)
        mlflow.log_metrics({f"split/{k}": v for k, v in sizes.items()})
        mlflow.log_metrics({f"class_fraction/{n}": c / counts.sum() for n, c in zip(CLASS_NAMES, counts)})
        tracking.log_dataset(PATHS["clean"], "output")
        images, masks = data.head(PATHS["clean"], "train", 4)
        fig = figures.perturbation_panel(images, images, masks, _onehot_logits(masks),
                                         "training samples (image, mask)")
        mlflow.log_figure(fig, "figures/samples.png")
        print(f"prepare: {PATHS['clean']} ({sizes['train']}/{sizes['valid']}/{sizes['test']} "
              f"train/valid/test, source {attrs['source']})")


def _onehot_logits(masks):
    import torch

    return torch.nn.functional.one_hot(masks, 6).permute(0, 3, 1, 2).float()


def _in_processes(args, p, nproc: int, device: str, work) -> None:
    """Run ``work(args, p, group)`` in this process, or, for ``nproc`` > 1, in each of the
    ``nproc`` processes of a torchrun job started in its place (mlsys.distributed)."""
    from . import distributed
    from .train import pick_device

    distributed.launch(nproc, args.argv)  # > 1: this process becomes torchrun
    with distributed.process_group(pick_device(device), p.distributed.timeout_s) as group:
        work(args, p, group)


def cmd_train(args, p) -> None:
    _in_processes(args, p, p.distributed.nproc.train, p.train.device, _train)


def _training_data(name: str):
    import torch

    from . import data
    from .train import MODELS

    paths = [PATHS["clean"] if s == "clean" else PATHS["set"].format(s) for s in MODELS[name]]
    parts = [data.load_split(path, "train") for path in paths]
    return paths, (torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])), \
        data.load_split(PATHS["clean"], "valid")


def _train_rank(args, p, group) -> None:
    """A torchrun rank other than 0: the same training steps, nothing logged or written."""
    import torch

    from .model import build_model
    from .train import epochs_for, train_model

    _, train, valid = _training_data(args.model)
    torch.manual_seed(p.train.seed)
    train_model(build_model(p.model), train, valid, p.train, epochs_for(args.model, p.train),
                progress=False, group=group)


def _train(args, p, group) -> None:
    import mlflow
    import torch

    from . import data, figures, tracking
    from .distributed import is_main
    from .evaluate import predict
    from .model import build_model
    from .params import section_dict
    from .train import MODELS, epochs_for, save_weights, train_model

    if not is_main(group):  # rank 0 alone logs, checkpoints and writes outputs
        return _train_rank(args, p, group)

    name = args.model
    sets = MODELS[name]
    params = {**{f"model.{k}": v for k, v in section_dict(p.model).items()},
              **{f"train.{k}": v for k, v in section_dict(p.train).items()}}
    epochs = epochs_for(name, p.train)
    params["train.epochs_effective"] = epochs
    params["train.sets"] = ",".join(sets)
    params["train.processes"] = group.world if group else 1
    params["train.batch_per_process"] = p.train.batch_size // (group.world if group else 1)
    with tracking.stage_run(f"train@{name}", params, p.tracking.experiment,
                            {"mlsys.stage": "train", "mlsys.model": name, "mlsys.method": _method_tag(name)}):
        paths, train, valid = _training_data(name)
        digests = {path: tracking.log_dataset(path, "training" if path in paths else "validation")
                   for path in dict.fromkeys(paths + [PATHS["clean"]])}
        torch.manual_seed(p.train.seed)
        model = build_model(p.model)
        fingerprint = json.dumps({"params": params, "data": digests}, sort_keys=True, default=str)

        def on_epoch(epoch: int, row: dict) -> None:
            mlflow.log_metrics({("train/loss" if k == "train_loss" else k.replace("_", "/", 1)): v
                                for k, v in row.items() if k != "epoch"}, step=epoch)

        Path(PATHS["checkpoint"].format(name)).parent.mkdir(parents=True, exist_ok=True)
        history = train_model(model, train, valid, p.train, epochs, PATHS["checkpoint"].format(name),
                              fingerprint, on_epoch, _progress(), group)
        model.cpu().eval()
        save_weights(model, p.model, PATHS["weights"].format(name),
                     {"model": name, "sets": list(sets), "epochs": epochs})
        best = min(history, key=lambda r: r["valid_loss"])
        summary = {"best/epoch": best["epoch"], "best/valid_loss": best["valid_loss"],
                   "best/val_dice": best["valid_dice"], "final/valid_loss": history[-1]["valid_loss"],
                   "final/valid_dice": history[-1]["valid_dice"],
                   "final/valid_accuracy": history[-1]["valid_accuracy"], "n_train_images": len(train[0])}
        mlflow.log_metrics(summary)
        # the registry (report stage) finds this run's model by the md5 DVC records for the weights
        mlflow.set_tag("mlsys.weights_md5", data.file_md5(PATHS["weights"].format(name)))
        _write_json(PATHS["train_metrics"].format(name), {**summary, "mlflow_run_id": mlflow.active_run().info.run_id})
        _write_csv(PATHS["train_plot"].format(name), history)
        mlflow.log_figure(figures.loss_curves({name: history}, f"{name}: loss per epoch"),
                          "figures/loss_curves.png")
        n = min(4, len(valid[0]))
        logits = predict(model, valid[0][:n], n, torch.device("cpu"))
        mlflow.log_figure(figures.prediction_panel(valid[0][:n], valid[1][:n], logits,
                                                   f"{name}: validation predictions"),
                          "figures/predictions_valid.png")
        mlflow.log_artifact(PATHS["weights"].format(name), "weights")
        if p.tracking.log_model:
            _log_model(model, valid[0][:2])
        Path(PATHS["checkpoint"].format(name)).unlink(missing_ok=True)  # done: the next run starts fresh
        print(f"train@{name}: {epochs} epochs, final valid loss {history[-1]['valid_loss']:.4f}, "
              f"dice {history[-1]['valid_dice']:.4f}")


def _log_model(model, example):
    """Log the U-Net as an MLflow model (torch.export format: ``example`` needs a batch >= 2);
    returns its ModelInfo."""
    import mlflow
    from mlflow.models import infer_signature

    x = example.numpy()
    with __import__("torch").no_grad():
        y = model(example).numpy()
    return mlflow.pytorch.log_model(model, name="model", signature=infer_signature(x, y), input_example=x,
                                    pip_requirements=["torch"])


def _write_csv(path: str, rows: list[dict]) -> None:
    from .data import atomic_path

    keys = list(rows[0])
    with atomic_path(path) as tmp:
        tmp.write_text(",".join(keys) + "\n" + "".join(",".join(f"{r[k]:.6g}" if isinstance(r[k], float)
                                                                else str(r[k]) for k in keys) + "\n"
                                                       for r in rows))


def cmd_evaluate(args, p) -> None:
    _in_processes(args, p, p.distributed.nproc.evaluate, p.train.device, _evaluate)


def _evaluate(args, p, group) -> None:
    import contextlib

    import mlflow
    import torch

    from . import data, figures, tracking
    from .distributed import ChunkStore, Shard, is_main, source_digest
    from .evaluate import evaluate_split, predict
    from .params import section_dict
    from .train import load_weights, pick_device

    name, cfg, acfg = args.model, p.evaluate, p.evaluate.attack
    shard = Shard.parse(args.shard) if args.shard else Shard()
    main = is_main(group) and shard.count == 1  # the process that logs and writes
    params = {f"evaluate.{k}": v for k, v in section_dict(cfg).items()}
    run = tracking.stage_run(f"evaluate@{name}", params, p.tracking.experiment,
                             {"mlsys.stage": "evaluate", "mlsys.model": name, "mlsys.method": _method_tag(name),
                              "mlsys.attack_mode": acfg.mode}) if main else contextlib.nullcontext()
    with run:
        device = group.device if group else pick_device(p.train.device)
        model = load_weights(PATHS["weights"].format(name), p.model).to(device).eval()
        out = Path(PATHS["eval_metrics"].format(name))
        store = ChunkStore(out.with_name(f".{out.name}.partial"), {  # finished chunks: resume and merge
            "weights_md5": data.file_md5(PATHS["weights"].format(name)), "clean_md5": data.file_md5(PATHS["clean"]),
            "evaluate": section_dict(cfg), "device": device.type,
            "code": source_digest("evaluate", "attacks", "model")}) if is_main(group) else None
        if main:
            tracking.log_dataset(PATHS["clean"], "evaluation")
        done = evaluate_split(model, PATHS["clean"], "test", cfg, device, store, shard, group, _progress())
        if done is None:  # a shard: its chunks are in the store for the merging run
            if shard.count > 1:
                print(f"evaluate@{name} shard {shard}: chunks in {store.folder}; run without --shard to merge")
            return
        clean, attacked, panel = done
        res = {"clean": clean.result(), "attack": attacked.result(),
               "attack_settings": {"mode": acfg.mode, "eps": acfg.eps, "steps": acfg.steps,
                                   "target": acfg.target, "alpha": acfg.alpha}}
        mlflow.log_metrics({f"{k}/{m}": v for k in ("clean", "attack") for m, v in res[k].items()})
        with data.atomic_dir(PATHS["eval_figures"].format(name)) as figs:  # a DVC out dir: all or nothing
            fig = figures.perturbation_panel(*panel, f"{name} under {acfg.mode} attack ({acfg.steps} steps, "
                                                     f"eps {acfg.eps}, target class {acfg.target})")
            mlflow.log_figure(fig, "figures/attack_panel.png")
            figures.save(fig, figs / "attack_panel.png")
            fig = figures.prediction_panel(panel[0], panel[2], predict(model.cpu(), panel[0], len(panel[0]),
                                                                       torch.device("cpu")),
                                           f"{name}: test predictions (clean)")
            mlflow.log_figure(fig, "figures/predictions_test.png")
            figures.save(fig, figs / "predictions_clean.png")
        _write_json(out, {**res, "mlflow_run_id": mlflow.active_run().info.run_id})
        store.remove()
        print(f"evaluate@{name}: clean accuracy {res['clean']['accuracy']:.4f} dice {res['clean']['dice']:.4f}"
              f" | attacked accuracy {res['attack']['accuracy']:.4f} dice {res['attack']['dice']:.4f}")


def cmd_augment(args, p) -> None:
    _in_processes(args, p, p.distributed.nproc.augment, p.augment.device, _augment)


def _augment(args, p, group) -> None:
    import contextlib

    import mlflow
    import torch

    from . import data, figures, ops, tracking
    from .augment import build_set
    from .distributed import Shard, is_main
    from .params import section_dict
    from .train import load_weights, pick_device

    method = args.method
    shard = Shard.parse(args.shard) if args.shard else Shard()
    main = is_main(group) and shard.count == 1  # the process that logs and writes
    mcfg = getattr(p.augment, method)
    params = {f"augment.{method}.{k}": v for k, v in section_dict(mcfg).items()}
    params["augment.seed"] = p.augment.seed
    run = tracking.stage_run(f"augment@{method}", params, p.tracking.experiment,
                             {"mlsys.stage": "augment", "mlsys.method": method,
                              "mlsys.ops_backend": ops.backend()}) if main else contextlib.nullcontext()
    with run:
        device = group.device if group else pick_device(p.augment.device)
        weights = PATHS["weights"].format("model1")
        model = load_weights(weights, p.model).to(device).eval()
        if main:
            tracking.log_dataset(PATHS["clean"], "source")
        out = PATHS["set"].format(method)
        provenance = {"producing_model": weights, "producing_model_md5": data.file_md5(weights),
                      "ops_backend": ops.backend()}
        stats = build_set(method, model, PATHS["clean"], out, p.augment, device, provenance, _progress(),
                          shard, group)
        if stats is None:
            if shard.count > 1:
                print(f"augment@{method} shard {shard}: chunks in .{Path(out).name}.partial; "
                      "run without --shard to merge")
            return
        mlflow.log_metrics(stats)
        _write_json(PATHS["augment_metrics"].format(method), stats)
        tracking.log_dataset(out, "output")
        clean, _ = data.head(PATHS["clean"], "train", 4)
        pert, masks = data.head(out, "train", 4)
        from .evaluate import predict

        logits = predict(model.cpu(), pert, len(pert), torch.device("cpu"))
        fig = figures.perturbation_panel(clean, pert, masks, logits, f"{method} training set")
        mlflow.log_figure(fig, "figures/perturbation_panel.png")
        print(f"augment@{method}: {out} ({int(stats['n_images'])} images, mean L-inf {stats['mean_linf']:.4f})")


def cmd_report(args, p) -> None:
    import csv
    import shutil

    import mlflow
    import torch

    from . import data, figures, report, tracking
    from .evaluate import predict
    from .train import MODELS, load_weights

    # reports/ is a DVC out dir written file by file: build it beside and rename it when complete
    with tracking.stage_run("report", {}, p.tracking.experiment, {"mlsys.stage": "report"}) as run, \
            data.atomic_dir(PATHS["report"]) as out:
        evals = {m: json.loads(Path(PATHS["eval_metrics"].format(m)).read_text()) for m in MODELS}
        t1, t2, attack = report.tables_from_eval(evals)
        figs: list[tuple[str, str]] = []
        (out / "figures").mkdir(parents=True, exist_ok=True)
        for name, tab, title in zip(("table1", "table2"), (t1, t2), report.table_titles(attack)):
            (out / f"{name}.csv").write_text(report.to_csv(tab))
            (out / f"{name}.md").write_text(report.to_markdown(tab, title))
            mlflow.log_table(tab, f"tables/{name}.json")
        histories = {}
        for m in MODELS:
            with open(PATHS["train_plot"].format(m)) as f:
                histories[m] = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
        fig = figures.loss_curves(histories, "validation loss of the four models", keys=("valid_loss",))
        figures.save(fig, out / "figures/validation_loss.png")
        figs.append(("Validation loss", "figures/validation_loss.png"))
        figures.save(figures.metric_bars(t1, t2, title=f"clean test split vs {attack}"),
                     out / "figures/clean_vs_attack.png")
        figs.append(("Clean vs attacked", "figures/clean_vs_attack.png"))
        figures.save(figures.per_class_bars(t1, t2), out / "figures/per_class_dice.png")
        figs.append(("Per-class Dice", "figures/per_class_dice.png"))
        _write_csv(PATHS["class_plot"], report.per_class_rows(evals))
        for m in MODELS:
            shutil.copy(Path(PATHS["eval_figures"].format(m)) / "attack_panel.png",
                        out / f"figures/{m}_attack_panel.png")
            figs.append((f"{report.MODEL_LABELS[m]} under attack", f"figures/{m}_attack_panel.png"))
        model1 = load_weights(PATHS["weights"].format("model1"), p.model).eval()
        clean, _ = data.head(PATHS["clean"], "train", p.evaluate.n_panel)
        for method in ("method1", "method2"):
            pert, masks = data.head(PATHS["set"].format(method), "train", p.evaluate.n_panel)
            logits = predict(model1, pert, len(pert), torch.device("cpu"))
            fig = figures.perturbation_panel(clean, pert, masks, logits,
                                             f"{method} training images (prediction: model 1)")
            figures.save(fig, out / f"figures/{method}_perturbation.png")
            figs.append((f"{method} perturbations", f"figures/{method}_perturbation.png"))
        summary = {"mlflow": {"pipeline_run_id": run.data.tags.get("mlflow.parentRunId", ""),
                              "report_run_id": run.info.run_id}}
        notes = ()
        if p.tracking.log_model:  # the champion joins the model registry
            summary["champion"] = _register_champion(evals, p)
            notes = (report.champion_line(evals, summary["champion"]["registered_model"],
                                          summary["champion"]["version"], tracking.CHAMPION_ALIAS),)
            print(notes[0])
        _write_json(PATHS["report_metrics"], summary)
        (out / "report.md").write_text(report.markdown_report(t1, t2, attack, figs, notes))
        (out / "report.html").write_text(report.html_report(t1, t2, attack, figs, out, notes))
        mlflow.log_artifacts(str(out), "report")
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent:  # the pipeline run carries the report too, where users look first
            mlflow.MlflowClient().log_artifacts(parent, str(out), "report")
        print((out / "table1.md").read_text())
        print((out / "table2.md").read_text())


def _register_champion(evals: dict[str, dict], p) -> dict:
    """Register the best of the four models (report.CHAMPION_CRITERION) as the
    ``champion`` of the MLflow registered model; returns what metrics/report.json says."""
    import mlflow

    from . import data, report, tracking
    from .train import load_weights

    best = report.champion(evals)
    weights = PATHS["weights"].format(best)
    dice = {k: evals[best][k]["dice"] for k in ("clean", "attack")}
    tags = {"mlsys.criterion": report.CHAMPION_CRITERION, "dvc.experiment": os.environ.get("DVC_EXP_NAME", "workspace"),
            "clean/dice": f"{dice['clean']:.6g}", "attack/dice": f"{dice['attack']:.6g}"}

    def log_model():  # where the store has no training run of these weights
        return _log_model(load_weights(weights, p.model).eval(), data.head(PATHS["clean"], "test", 2)[0])

    version = tracking.register_champion(best, weights, log_model, tags)
    mlflow.set_tags({"mlsys.champion": best, "mlsys.champion_version": version.version})
    return {"model": best, "registered_model": version.name, "version": int(version.version),
            "attack_dice": dice["attack"], "clean_dice": dice["clean"]}


def cmd_compare(args, p) -> None:
    from mlflow.tracking import MlflowClient

    from . import report, tracking
    from .train import MODELS

    exp_id = tracking.setup(p.tracking.experiment)
    client = MlflowClient()
    parent = args.parent
    if parent is None:
        found = client.search_runs([exp_id], "tags.`mlsys.kind` = 'pipeline'", max_results=1,
                                   order_by=["attributes.start_time DESC"])
        parent = found[0].info.run_id if found else None
    flt = "attributes.status = 'FINISHED' and tags.`mlsys.stage` = 'evaluate'"
    runs = client.search_runs([exp_id], flt, order_by=["attributes.start_time DESC"], max_results=500)
    if parent:
        inside = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
        runs = inside or runs   # cached stages log no run: fall back to the latest of each model
    latest = {}
    for r in runs:
        latest.setdefault(r.data.tags.get("mlsys.model"), r)
    missing = [m for m in MODELS if m not in latest]
    if len(missing) == len(MODELS):
        raise ConnectionError(f"no finished evaluate runs in experiment {p.tracking.experiment!r} "
                              f"at {tracking.redact(tracking.tracking_uri())}; run `dvc repro` first")
    evals = {}
    for m in MODELS:
        if m in latest:
            met, tags = latest[m].data.metrics, latest[m].data.params
            evals[m] = {"clean": {k[6:]: v for k, v in met.items() if k.startswith("clean/")},
                        "attack": {k[7:]: v for k, v in met.items() if k.startswith("attack/")},
                        "attack_settings": {"mode": tags.get("evaluate.attack.mode"),
                                            "steps": tags.get("evaluate.attack.steps"),
                                            "eps": tags.get("evaluate.attack.eps"),
                                            "alpha": tags.get("evaluate.attack.alpha"),
                                            "target": int(tags.get("evaluate.attack.target", 0))}}
    t1, t2, attack = report.tables_from_eval(evals)
    print(f"runs: {', '.join(f'{m}={latest[m].info.run_id[:8]}' for m in MODELS if m in latest)}"
          + (f" (missing: {', '.join(missing)})" if missing else ""))
    for tab, title in zip((t1, t2), report.table_titles(attack)):
        print(report.to_markdown(tab, title))


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
    ap = argparse.ArgumentParser(prog="mlsys", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="build data/clean.h5 (synthetic default or your PanNuke fold)")
    s = sub.add_parser("train", help="train one of the four models")
    s.add_argument("model", choices=["model1", "model2", "model3", "model4"])
    s = sub.add_parser("augment", help="build a method-one or method-two training set with model 1")
    s.add_argument("method", choices=["method1", "method2"])
    shard_help = ("compute only shard i of n (chunks j with j mod n == i) and keep them for the merge: "
                  "a later run without --shard merges every shard into the same output as one process")
    s.add_argument("--shard", metavar="I/N", help=shard_help)
    s = sub.add_parser("evaluate", help="evaluate one model on the test split, clean and under attack")
    s.add_argument("model", choices=["model1", "model2", "model3", "model4"])
    s.add_argument("--shard", metavar="I/N", help=shard_help)
    sub.add_parser("report", help="write Tables 1 and 2 and the figures to reports/")
    s = sub.add_parser("compare", help="print Tables 1 and 2 from the MLflow runs")
    s.add_argument("--parent", help="pipeline parent run id (default: the latest pipeline)")
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
            "report": cmd_report, "compare": cmd_compare, "ui": cmd_ui, "server": cmd_server,
            "runs": cmd_runs}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what torchrun re-runs (distributed.launch)
    debug = args.debug or os.environ.get("MLSYS_DEBUG") == "1"
    from .data import DataError
    from .params import ParamsError, load_params

    try:
        from .train import CheckpointError

        p = load_params(args.params)
        COMMANDS[args.command](args, p)
    except (ParamsError, DataError, CheckpointError, ConnectionError) as err:
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
