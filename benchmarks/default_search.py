"""Search for a CPU default configuration whose model 1 converges (issue 12 item 7).

For each candidate (synthetic n_images, image_size, U-Net base/depth, epochs,
batch size, lr schedule) it builds the synthetic data once (``mlsys.prepare.prepare``
into a temporary HDF5), trains model 1 per seed with ``mlsys.train.train_model``
(``torch.manual_seed(seed)`` before ``build_model``, as the train stage does),
keeps the state_dict of the epoch with the LOWEST VALIDATION LOSS (the
``train.keep: best`` rule, emulated through ``on_epoch``), and evaluates that kept
model on the TEST split with ``mlsys.metrics.evaluate_model`` ("dice" = macro nucleus
Dice). Each (config, seed) result is appended to the JSON file as soon as it is
measured, with the training wall time and the thread count it ran under.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/default_search.py \
        --configs base lr2 --seeds 0 --threads 1 --epochs 15

``--epochs`` overrides the config's epochs (quick screens); ``--list`` prints the
candidates. Results: benchmarks/results/default_search.json (list of rows).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from mlsys.data import load_split
from mlsys.prepare import prepare
from mlsys.metrics import evaluate_model
from mlsys.params import DataParams, ModelParams, TrainParams
from mlsys.train import train_model

# name -> overrides of BASE, the CPU default when the search ran (params.yaml then: 30 epochs of
# batch 18, step schedule; the search chose batch 8, 40 epochs, the authors' U-Net). variant/init
# "": ModelParams' defaults, which are now the authors' U-Net ("original", "glorot"), so "base"
# today no longer builds the textbook U-Net it measured then.
BASE = {"n_images": 300, "image_size": 32, "base": 8, "depth": 3, "epochs": 30, "batch_size": 18,
        "lr": 0.004, "lr_decay": 0.1, "lr_step": 10, "variant": "", "init": "", "schedule": "step"}
CONFIGS: dict[str, dict] = {
    "base": {},                                                  # the default of the time
    "lr2": {"lr": 0.002},
    "lr1": {"lr": 0.001},
    "lr1_b8": {"lr": 0.001, "batch_size": 8},
    "lr2_b8": {"lr": 0.002, "batch_size": 8},
    "lr2_w16": {"lr": 0.002, "base": 16},
    "lr1_w16": {"lr": 0.001, "base": 16},
    "lr2_n600": {"lr": 0.002, "n_images": 600},
    "lr2_s48": {"lr": 0.002, "image_size": 48, "n_images": 300},
    "lr2_s64": {"lr": 0.002, "image_size": 64, "n_images": 200},
    "lr2_d2": {"lr": 0.002, "depth": 2},
    "lr2_e60": {"lr": 0.002, "epochs": 60},
    "lr2_fast_decay": {"lr": 0.002, "lr_decay": 0.3, "lr_step": 5},
    "b8": {"batch_size": 8},                                     # lr 0.004, more steps per epoch
    "b12": {"batch_size": 12},
    "lr8": {"lr": 0.008},
    "nodecay": {"lr_decay": 0.0},
    "d2": {"depth": 2},
    "w12": {"base": 12},
    "n450": {"n_images": 450},
    # the authors' schedule and U-Net (train.schedule, model.variant/init)
    "b8_keras": {"batch_size": 8, "schedule": "keras"},
    "b8_orig": {"batch_size": 8, "schedule": "keras", "variant": "original", "init": "glorot"},
    "b8_orig_he": {"batch_size": 8, "schedule": "keras", "variant": "original", "init": "he"},
}
RESULTS = Path(__file__).parent / "results" / "default_search.json"


def full(name: str) -> dict:
    if name not in CONFIGS:
        raise SystemExit(f"unknown config {name!r}; expected one of {sorted(CONFIGS)}")
    return {**BASE, **CONFIGS[name]}


_DATA: dict[tuple[int, int], tuple] = {}


def data_for(c: dict, tmp: str) -> tuple:
    """(train, valid, test) tensors of the synthetic set of config ``c`` (cached)."""
    key = (c["n_images"], c["image_size"])
    if key not in _DATA:
        path = os.path.join(tmp, f"clean_{key[0]}_{key[1]}.h5")
        prepare(DataParams(n_images=key[0], image_size=key[1]), path, progress=False)
        _DATA[key] = tuple(load_split(path, s) for s in ("train", "valid", "test"))
    return _DATA[key]


def build(c: dict):
    mcfg = ModelParams(base=c["base"], depth=c["depth"])
    for key in ("variant", "init"):  # "": ModelParams' default
        if c[key]:
            mcfg = replace(mcfg, **{key: c[key]})
    from mlsys.model import build_model

    return build_model(mcfg), mcfg


def run_one(name: str, c: dict, seed: int, threads: int, tmp: str) -> dict:
    train, valid, test = data_for(c, tmp)
    tcfg = TrainParams(epochs=c["epochs"], batch_size=c["batch_size"], lr=c["lr"], lr_decay=c["lr_decay"],
                       lr_step=c["lr_step"], seed=seed, device="cpu")
    fields = {f.name for f in dataclasses.fields(TrainParams)}
    if "keep" in fields:  # a train.py that keeps the best epoch itself: keep the last, we pick the best
        tcfg = replace(tcfg, keep="last")
    if "schedule" in fields:
        tcfg = replace(tcfg, schedule=c["schedule"])
    elif c["schedule"] != "step":
        raise SystemExit(f"schedule {c['schedule']!r} needs a train.py with train.schedule (PYTHONPATH)")
    torch.manual_seed(seed)
    model, _ = build(c)
    best = {"loss": math.inf, "epoch": -1, "state": None}

    def keep_best(epoch: int, row: dict) -> None:
        if row["valid_loss"] < best["loss"]:
            best.update(loss=row["valid_loss"], epoch=epoch, state=copy.deepcopy(model.state_dict()))

    t0, c0 = time.perf_counter(), time.process_time()
    history = train_model(model, train, valid, tcfg, c["epochs"], on_epoch=keep_best, progress=False)
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    last = evaluate_model(model, *test, 32, torch.device("cpu"))
    model.load_state_dict(best["state"])
    kept = evaluate_model(model, *test, 32, torch.device("cpu"))
    import mlsys

    return {"config": name, **c, "seed": seed, "threads": threads, "code": str(Path(mlsys.__file__).parent),
            "n_train": len(train[0]), "n_valid": len(valid[0]), "n_test": len(test[0]),
            "test_dice": kept["dice"], "test_dice_last_epoch": last["dice"],
            "test_per_class": {k: v for k, v in kept.items() if k.startswith("dice/")},
            "best_epoch": best["epoch"], "best_valid_loss": best["loss"],
            "valid_dice_at_best": history[best["epoch"]]["valid_dice"],
            "valid_loss_curve": [round(r["valid_loss"], 4) for r in history],
            "train_s": round(train_s, 2), "train_cpu_s": round(train_cpu_s, 2),
            "load_avg_1min": round(os.getloadavg()[0], 2)}


def summary(rows: list[dict]) -> None:
    """One line per (config, epochs, threads); a seed run twice (a reproducibility check:
    same dice at 1 thread) counts once, its latest row."""
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["epochs"], r["threads"]), {})[r["seed"]] = r
    for (name, epochs, threads), by_seed in groups.items():
        rs = [by_seed[s] for s in sorted(by_seed)]
        d = [r["test_dice"] for r in rs]
        sd = statistics.stdev(d) if len(d) > 1 else float("nan")
        print(f"{name:16s} ep={epochs:3d} thr={threads} n={len(d)} dice {statistics.mean(d):.3f} ± {sd:.3f} "
              f"[{', '.join(f'{x:.3f}' for x in d)}] best ep {[r['best_epoch'] for r in rs]} "
              f"last-ep dice {[round(r['test_dice_last_epoch'], 3) for r in rs]} "
              f"train s {[r['train_s'] for r in rs]} cpu s {[r.get('train_cpu_s') for r in rs]}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="*", default=["base"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=None, help="override the configs' epochs (screens)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--summary", action="store_true", help="print the table of the results file")
    a = ap.parse_args(argv)
    out = Path(a.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    if a.list:
        for n in CONFIGS:
            print(n, full(n))
        return
    if a.summary:
        summary(rows)
        return
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.configs:
            c = full(name)
            if a.epochs:
                c["epochs"] = a.epochs
            for seed in a.seeds:
                r = run_one(name, c, seed, a.threads, tmp)
                rows.append(r)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(rows, indent=1) + "\n")
                print(f"{name} seed {seed}: test dice {r['test_dice']:.3f} (last epoch "
                      f"{r['test_dice_last_epoch']:.3f}) best epoch {r['best_epoch']} "
                      f"train {r['train_s']:.1f} s on {a.threads} thread(s)", flush=True)
    summary([r for r in rows if r["config"] in a.configs])


if __name__ == "__main__":
    sys.exit(main())
