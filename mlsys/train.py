"""Training of the four models (paper section 3 and 4).

Model 1 trains on the clean training split, model 2 on the method-one set, model 3
on the method-two set and model 4 on all three together for a fraction of the
epochs (the paper says "reduced by two thirds"; ``train.model4_epoch_fraction``).
Every model validates on the clean validation split.

Adam, pixel cross-entropy, learning rate ``lr * exp(-lr_decay)`` every ``lr_step``
epochs (:func:`lr_at`). The weights kept at the end are those of the epoch with the
lowest validation loss, as the authors' Keras ModelCheckpoint(save_best_only=True)
keeps, or of the last epoch (``train.keep``; :func:`kept_epoch`). A checkpoint is
written after every epoch and training resumes from it; random state is re-seeded
from (seed, epoch) at each epoch start, so a resumed run on CPU reproduces an
uninterrupted one bit for bit.

The loop is the only one of the project: the adversarial-training baselines
(:mod:`mlsys.adversarial`) run it with their own per-batch loss (``batch_loss``: the inner
attack and the training objective), so this module holds no attack code.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm  # tqdm.write: lines that keep a terminal's bar intact

from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from . import entry
from .distributed import Group, all_sum, broadcast
from .files import atomic_path
from .hardware import machine, pick_device
from .metrics import evaluate_model
from .model import UNet, build_model
from .params import EXPERIMENT, MODELS, TrainParams, method_tag
from .progress import bar as progress_bar
from .weights import CheckpointError, safe_load, save_weights


# batch_loss(net, model, x, y) -> the scalar loss of one batch: ``net`` is what the optimiser
# steps through (DDP, torch.compile), ``model`` the bare U-Net (an inner attack's gradient
# forwards go around DDP's gradient reducer); x (B, 3, H, W) in [0, 1], y (B, H, W) int64
BatchLoss = Callable[[torch.nn.Module, torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def clean_loss(net: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The four models' loss: pixel cross-entropy of the clean batch."""
    return F.cross_entropy(net(x), y)


def epochs_for(model_name: str, cfg: TrainParams) -> int:
    return max(1, round(cfg.epochs * cfg.model4_epoch_fraction)) if model_name == "model4" else cfg.epochs


def lr_at(epoch: int, cfg: TrainParams) -> float:
    """Learning rate of the 0-based ``epoch``: lr * e^(-lr_decay) every lr_step epochs.

    ``cfg.schedule == "keras"`` is the authors' code: Keras' LearningRateScheduler calls
    PokeNet.py's ``scheduler(epoch, lr)`` at the start of every 0-based epoch with the
    optimiser's current lr, and it returns ``lr * exp(-0.1)`` when ``epoch % 10 == 0``, so
    the first decay already applies at epoch 0: lr_e = lr * exp(-lr_decay * (e // lr_step + 1)),
    epochs 0-9 at 0.004 e^-0.1 = 0.003619, 10-19 at 0.004 e^-0.2, ...
    ``"step"``: lr_e = lr * exp(-lr_decay * (e // lr_step)), epochs 0-9 at lr itself."""
    decays = epoch // cfg.lr_step + (1 if cfg.schedule == "keras" else 0)
    return cfg.lr * math.exp(-cfg.lr_decay * decays)


def kept_epoch(history: list[dict], keep: str) -> int:
    """The epoch whose weights training keeps: ``keep == "last"``: the last row's; ``"best"``:
    the lowest ``valid_loss``, the earliest on ties (Keras ModelCheckpoint(save_best_only=True)
    on val_loss saves only on a strict improvement; a NaN or infinite loss never counts;
    if no epoch has a finite loss the last one is kept). ``history``: rows of train_model."""
    if not history:
        raise ValueError("kept_epoch: the history is empty (no epoch trained)")
    if keep not in ("best", "last"):
        raise ValueError(f"kept_epoch: keep = {keep!r} is unknown; expected \"best\" or \"last\"")
    kept, best = history[-1]["epoch"], math.inf
    if keep == "best":
        for row in history:
            if row["valid_loss"] < best:  # False for NaN, as numpy's less in Keras
                kept, best = row["epoch"], row["valid_loss"]
    return kept


def _seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Dropout draws of an epoch (the shuffle is the sampler's, seeded alike)."""
    torch.manual_seed(seed * 100_003 + epoch + 7_919 * rank)


def _check_inputs(model: UNet, train: tuple, valid: tuple, cfg: TrainParams, world: int) -> None:
    """One-line errors for a batch the data or the processes cannot fill, masks beyond the
    model's classes, and images the U-Net cannot pool."""
    from .params import ParamsError

    if cfg.batch_size > len(train[0]):
        raise ParamsError(f"params: train.batch_size = {cfg.batch_size} is invalid; expected at most "
                          f"the {len(train[0])} training images")
    if cfg.batch_size % world:
        raise ParamsError(f"params: train.batch_size = {cfg.batch_size} is invalid; expected a multiple of "
                          f"the {world} processes (the global batch is split evenly)")
    n_classes = model.head.out_channels
    if int(train[1].max()) >= n_classes or int(valid[1].max()) >= n_classes:
        raise ParamsError(f"params: model.n_classes = {n_classes} is invalid; the masks hold class ids up "
                          f"to {max(int(train[1].max()), int(valid[1].max()))}")
    side = 2 ** getattr(model, "depth", 0)
    if train[0].shape[-1] % side or train[0].shape[-2] % side:
        raise ParamsError(f"params: model.depth = {model.depth} cannot pool the "
                          f"{train[0].shape[-2]}x{train[0].shape[-1]} images; expected a depth whose "
                          f"2**depth divides the image side")


def _resumable(checkpoint: str | os.PathLike | None, fingerprint: str, cfg: TrainParams) -> dict | None:
    """The checkpoint's state where it is of this very training (same ``fingerprint``) and holds
    what ``cfg.keep`` needs; None to start over. A file that is no checkpoint is refused."""
    if not checkpoint or not Path(checkpoint).exists():
        return None
    state = safe_load(checkpoint, "checkpoint", "cpu")  # delete a refused one to start over
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch", "history"} <= set(state):
        raise CheckpointError(f"checkpoint {checkpoint} is not an mlsys training checkpoint; "
                              "delete it to start over")
    if state.get("fingerprint") != fingerprint:
        return None
    if cfg.keep == "best" and state.get("best", {}).get("epoch") != kept_epoch(state["history"], "best"):
        print(f"train: checkpoint {checkpoint} lacks the best weights so far; starting over", flush=True)
        return None
    return state


def _epoch_steps(step, model: UNet, opt, batch_loss: BatchLoss, images: torch.Tensor, masks: torch.Tensor,
                 order: torch.Tensor, per_rank: int, device: torch.device, amp: bool, bar) -> tuple[float, int]:
    """One epoch's optimiser steps over this rank's share ``order`` of the images, ``per_rank``
    a step; returns (summed loss, images seen)."""
    total, seen = 0.0, 0
    for b in range(0, len(order), per_rank):
        idx = order[b:b + per_rank]
        x, y = images[idx].to(device, non_blocking=True), masks[idx].to(device, non_blocking=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            loss = batch_loss(step, model, x, y)  # an inner attack restores the train mode it found
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP: gradients averaged over the ranks (equal shares: the global mean)
        opt.step()
        total += loss.item() * len(idx)  # a device sync per batch; negligible next to the step
        seen += len(idx)
        bar.set_postfix(loss=f"{total / seen:.4f}", refresh=False)
        bar.update(1)
    bar.close()
    return total, seen


def train_model(model: UNet, train: tuple[torch.Tensor, torch.Tensor], valid: tuple[torch.Tensor, torch.Tensor],
                cfg: TrainParams, epochs: int, checkpoint: str | os.PathLike | None = None,
                fingerprint: str = "", on_epoch: Callable[[int, dict], None] | None = None,
                progress: bool = True, group: Group | None = None,
                batch_loss: BatchLoss = clean_loss) -> list[dict]:
    """Train ``model`` in place; returns the per-epoch history.

    train/valid: images (N, 3, H, W) float in [0, 1] and masks (N, H, W) int64.
    ``checkpoint``: file rewritten after every epoch; an existing one with the same
    ``fingerprint`` (params + data digests) is resumed from.
    ``on_epoch(epoch, row)`` is called after each epoch (logging).
    ``batch_loss``: the loss of one batch (:data:`BatchLoss`); the default is the clean
    pixel cross-entropy, the adversarial baselines pass their inner attack and objective.

    ``group`` (torchrun, :mod:`mlsys.distributed`): DistributedDataParallel over its W
    processes. ``cfg.batch_size`` stays the global batch: each rank takes batch_size / W
    images of every step from a DistributedSampler whose seeded shuffle is the
    single-process order, so W processes follow the single-process trajectory (up to
    float summation order, dropout draws, and the up to W - 1 images the sampler repeats
    when W does not divide N). Rank 0 alone writes the checkpoint and gets ``on_epoch``;
    every rank resumes from rank 0's checkpoint; validation is split across the ranks.

    At the end ``model`` holds the weights of ``kept_epoch(history, cfg.keep)``: the lowest
    validation loss (``"best"``, the authors' ModelCheckpoint) or the last epoch. The best
    weights so far travel in the checkpoint, so a resumed run keeps the same ones; every
    rank tracks them alike (the validation loss is reduced over the ranks)."""
    rank, world = (group.rank, group.world) if group else (0, 1)
    main = rank == 0
    _check_inputs(model, train, valid, cfg, world)
    device = group.device if group else pick_device(cfg.device)
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history: list[dict] = []
    start = 0
    state = broadcast(_resumable(checkpoint, fingerprint, cfg) if main else None, group)  # rank 0's, on every rank
    best = None  # {"epoch", "model"}: the weights of the lowest validation loss so far (keep == "best")
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history, start = state["history"], state["epoch"] + 1
        best = state.get("best") if cfg.keep == "best" else None
        if main:
            print(f"train: resumed from {checkpoint} after epoch {start} of {epochs}"
                  + (f" (all {world} processes)" if world > 1 else ""), flush=True)
        for row in history:  # the new run gets the whole curve, not only the new epochs
            if on_epoch:
                on_epoch(row["epoch"], row)
    net = model if group is None else DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    step = net if not cfg.compile else torch.compile(net)
    images, masks = train
    amp = cfg.amp and device.type == "cuda"
    per_rank = cfg.batch_size // world
    # the single-process shuffle of epoch e is randperm(N) seeded with seed * 100_003 + e;
    # the sampler deals rank r the positions r, r + W, ... of it, so the W shares of step k
    # together are exactly the single-process batch k
    sampler = DistributedSampler(range(len(images)), num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.seed * 100_003)
    for epoch in range(start, epochs):
        _seed_epoch(cfg.seed, epoch, rank)
        sampler.set_epoch(epoch)
        for pg in opt.param_groups:
            pg["lr"] = lr_at(epoch, cfg)
        model.train()
        order = torch.tensor(list(sampler))
        # on a terminal a bar per epoch; in a log only the epoch's line below
        bar = progress_bar(-(-len(order) // per_rank), f"epoch {epoch + 1}/{epochs}", "batch", progress and main,
                           lines=False, leave=False)
        total, seen = _epoch_steps(step, model, opt, batch_loss, images, masks, order, per_rank, device, amp, bar)
        total, seen = all_sum(torch.tensor([total, seen], dtype=torch.float64), group).tolist()
        lo, hi = rank * len(valid[0]) // world, (rank + 1) * len(valid[0]) // world
        bits = valid[2][lo:hi] if len(valid) > 2 and valid[2] is not None else None  # the paper metric's truth
        val = evaluate_model(model, valid[0][lo:hi], valid[1][lo:hi], cfg.batch_size, device, group=group,
                             channels=bits)
        row = {"epoch": epoch, "lr": lr_at(epoch, cfg), "train_loss": total / seen,
               "valid_loss": val["loss"], "valid_accuracy": val["accuracy"],
               "valid_dice": val["dice"], "valid_jaccard": val["jaccard"],
               "valid_paper_dice": val["paper_dice"]}
        history.append(row)
        if cfg.keep == "best" and kept_epoch(history, "best") == epoch:
            best = {"epoch": epoch, "model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        if checkpoint and main:
            with atomic_path(checkpoint) as tmp:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                            "history": history, "fingerprint": fingerprint,
                            **({"best": best} if best is not None else {})}, tmp)
        if on_epoch:
            on_epoch(epoch, row)
        if progress and main:
            tqdm.write(f"epoch {epoch + 1}/{epochs}  train loss {row['train_loss']:.4f}  "
                       f"valid loss {row['valid_loss']:.4f}  valid dice {row['valid_dice']:.4f}")
    kept = kept_epoch(history, cfg.keep)
    if kept != history[-1]["epoch"]:  # the model holds the last epoch's weights; bring back the kept ones
        model.load_state_dict(best["model"])
    return history


# --------------------------------------------------------------------------- the train stage


def training_data(name: str, seed: int):
    """(training set paths, (images, masks) of their training splits concatenated,
    (images, masks) of the clean validation split) of model ``name`` at ``seed``."""
    from . import paths
    from .data import load_split
    from .files import require

    sets = [paths.dataset(s, seed) for s in EXPERIMENT[name]]
    for s, path in zip(EXPERIMENT[name], sets):
        require(path, "prepare" if s == "clean" else paths.stage_name("augment", s, seed))
    parts = [load_split(path, "train") for path in sets]
    return sets, (torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])), \
        load_split(paths.CLEAN, "valid", channels=True)


def main(p, name: str, seed: int, relaunch: list[str], epochs: int | None = None,
         batch_loss: BatchLoss = clean_loss, extra: dict | None = None) -> None:
    """DVC stage ``train-<name>@<seed>``: ``models/seed<seed>/<name>.pt``, its per-epoch curve
    (``plots/train/...csv``) and summary (``metrics/train/...json``), one MLflow run with
    every epoch's metrics, figures and the logged model. ``distributed.nproc.train`` > 1:
    DistributedDataParallel under torchrun (the interpreter arguments ``relaunch`` re-run there).
    The adversarial baselines' stage (:mod:`mlsys.adversarial`) is this one with its own
    ``epochs``, ``batch_loss`` and ``extra`` params (logged, and part of the resume fingerprint)."""
    from dataclasses import replace

    from .distributed import in_processes

    cfg = replace(p.train, seed=seed)
    epochs = epochs_for(name, cfg) if epochs is None else epochs
    in_processes(p.distributed.nproc.train, relaunch, pick_device(cfg.device), p.distributed.timeout_s,
                 lambda group: _train_stage(p, cfg, name, seed, group, epochs, batch_loss, extra or {}))


def _train_stage(p, cfg: TrainParams, name: str, seed: int, group: Group | None, epochs: int,
                 batch_loss: BatchLoss, extra: dict) -> None:
    import json

    import mlflow

    from . import figures, paths, tracking
    from .distributed import is_main
    from .files import file_md5, write_csv, write_json
    from .metrics import predict
    from .params import section_dict, show_progress

    if not is_main(group):  # a torchrun rank other than 0: the same steps, nothing logged or written
        _, train, valid = training_data(name, seed)
        torch.manual_seed(seed)
        train_model(build_model(p.model), train, valid, cfg, epochs, progress=False, group=group,
                    batch_loss=batch_loss)
        return
    world = group.world if group else 1
    params = {**{f"model.{k}": v for k, v in section_dict(p.model).items()},
              **{f"train.{k}": v for k, v in section_dict(cfg).items()}, **extra,
              "train.epochs_effective": epochs, "train.sets": ",".join(EXPERIMENT[name]),
              "train.processes": world, "train.batch_per_process": cfg.batch_size // world}
    weights = paths.weights(name, seed)
    with tracking.stage_run(paths.stage_name("train", name, seed), params, p.tracking.experiment,
                            {"mlsys.stage": "train", "mlsys.model": name, "mlsys.method": method_tag(name),
                             "mlsys.seed": str(seed)}):
        sets, train, valid = training_data(name, seed)
        digests = {path: tracking.log_dataset(path, "training" if path in sets else "validation")
                   for path in dict.fromkeys(sets + [paths.CLEAN])}
        torch.manual_seed(seed)
        model = build_model(p.model)
        fingerprint = json.dumps({"params": params, "data": digests}, sort_keys=True, default=str)

        def on_epoch(epoch: int, row: dict) -> None:
            mlflow.log_metrics({("train/loss" if k == "train_loss" else k.replace("_", "/", 1)): v
                                for k, v in row.items() if k != "epoch"}, step=epoch)

        checkpoint = paths.checkpoint(name, seed)
        Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
        with tracking.timed("compute"):
            history = train_model(model, train, valid, cfg, epochs, checkpoint, fingerprint, on_epoch,
                                  show_progress(), group, batch_loss)
        model.cpu().eval()
        save_weights(model, p.model, weights, {"model": name, "seed": seed, "sets": list(EXPERIMENT[name]),
                                               "epochs": epochs})
        kept = history[kept_epoch(history, cfg.keep)]  # the weights saved: train.keep
        summary = {"kept/epoch": kept["epoch"], "kept/valid_loss": kept["valid_loss"],
                   "kept/valid_dice": kept["valid_dice"], "kept/valid_accuracy": kept["valid_accuracy"],
                   "last/valid_loss": history[-1]["valid_loss"], "last/valid_dice": history[-1]["valid_dice"],
                   "n_train_images": len(train[0])}
        mlflow.log_metrics(summary)
        # the registry (report stage) finds this run's model by the md5 DVC records for the weights
        mlflow.set_tag("mlsys.weights_md5", file_md5(weights))
        write_json(paths.train_metrics(name, seed), {**summary, "mlflow_run_id": mlflow.active_run().info.run_id,
                                                        "machine": machine()})
        write_csv(paths.train_plot(name, seed), history)
        mlflow.log_figure(figures.loss_curves({name: history}, f"{name} (seed {seed}): loss per epoch"),
                          "figures/loss_curves.png")
        n = min(4, len(valid[0]))
        logits = predict(model, valid[0][:n], n, torch.device("cpu"))
        mlflow.log_figure(figures.prediction_panel(valid[0][:n], valid[1][:n], logits,
                                                   f"{name} (seed {seed}): validation predictions"),
                          "figures/predictions_valid.png")
        mlflow.log_artifact(weights, "weights")
        if p.tracking.log_model:
            tracking.log_model(model, valid[0][:2])
        Path(checkpoint).unlink(missing_ok=True)  # done: the next run starts fresh
        print(f"{paths.stage_name('train', name, seed)}: {epochs} epochs, kept epoch {kept['epoch']} "
              f"({cfg.keep}): valid loss {kept['valid_loss']:.4f}, dice {kept['valid_dice']:.4f}")


def cli(argv: list[str] | None = None) -> int:
    """``python -m mlsys.train <model> [--seed S]``: the stage as DVC runs it."""
    ap = entry.parser("python -m mlsys.train", "Train one of the four models (DVC stage train-<model>@<seed>).")
    ap.add_argument("model", choices=list(MODELS))  # the baselines: mlsys.adversarial
    ap.add_argument("--seed", type=int, help=entry.SEED_HELP)
    return entry.main("mlsys train", "mlsys.train", ap,
                      lambda a, p: main(p, a.model, entry.seed_of(a, p), a.relaunch), argv)


if __name__ == "__main__":
    entry.finish(cli())
