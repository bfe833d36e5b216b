"""Training of the four models (paper section 3 and 4).

Model 1 trains on the clean training split, model 2 on the method-one set, model 3
on the method-two set and model 4 on all three together for a fraction of the
epochs (the paper says "reduced by two thirds"; ``train.model4_epoch_fraction``).
Every model validates on the clean validation split.

Adam, pixel cross-entropy, learning rate ``lr * exp(-lr_decay)`` every ``lr_step``
epochs. A checkpoint is written after every epoch and training resumes from it;
random state is re-seeded from (seed, epoch) at each epoch start, so a resumed run
on CPU reproduces an uninterrupted one bit for bit.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import atomic_path
from .evaluate import evaluate
from .model import UNet, build_model
from .params import ModelParams, TrainParams

# Which datasets (data/<name>.h5, training split) each of the four models learns from.
MODELS: dict[str, tuple[str, ...]] = {
    "model1": ("clean",),
    "model2": ("method1",),
    "model3": ("method2",),
    "model4": ("clean", "method1", "method2"),
}


class CheckpointError(ValueError):
    """A weights file does not fit the configured model."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def epochs_for(model_name: str, cfg: TrainParams) -> int:
    return max(1, round(cfg.epochs * cfg.model4_epoch_fraction)) if model_name == "model4" else cfg.epochs


def lr_at(epoch: int, cfg: TrainParams) -> float:
    """Learning rate of an epoch: lr * e^(-lr_decay) every lr_step epochs (original code)."""
    return cfg.lr * math.exp(-cfg.lr_decay * (epoch // cfg.lr_step))


def _seed_epoch(seed: int, epoch: int) -> torch.Generator:
    torch.manual_seed(seed * 100_003 + epoch)  # dropout draws
    return torch.Generator().manual_seed(seed * 100_003 + epoch)  # shuffle order


def save_weights(model: UNet, cfg: ModelParams, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Weights as a plain state_dict + config: loading them never runs code."""
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "config": asdict(cfg), "meta": meta or {}}, tmp)


def load_weights(path: str | os.PathLike, cfg: ModelParams, map_location="cpu") -> UNet:
    """A U-Net of config ``cfg`` with the weights at ``path`` (``weights_only`` loading)."""
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"weights {path} do not exist") from None
    except Exception as err:  # noqa: BLE001 - unpickling refusals and corrupt files
        raise CheckpointError(f"weights {path} cannot be loaded safely: {str(err).splitlines()[0]}") from None
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise CheckpointError(f"weights {path} are not an mlsys weights file")
    saved = blob.get("config", {})
    if saved and saved != asdict(cfg):
        diff = {k: (saved.get(k), v) for k, v in asdict(cfg).items() if saved.get(k) != v}
        raise CheckpointError(f"weights {path} were trained with model {saved}, params say "
                              f"{asdict(cfg)} (differs in {sorted(diff)})")
    model = build_model(cfg)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"weights {path} do not fit the U-Net: {str(err).splitlines()[0]}") from None
    return model


def train_model(model: UNet, train: tuple[torch.Tensor, torch.Tensor], valid: tuple[torch.Tensor, torch.Tensor],
                cfg: TrainParams, epochs: int, checkpoint: str | os.PathLike | None = None,
                fingerprint: str = "", on_epoch: Callable[[int, dict], None] | None = None,
                progress: bool = True) -> list[dict]:
    """Train ``model`` in place; returns the per-epoch history.

    train/valid: images (N, 3, H, W) float in [0, 1] and masks (N, H, W) int64.
    ``checkpoint``: file rewritten after every epoch; an existing one with the same
    ``fingerprint`` (params + data digests) is resumed from.
    ``on_epoch(epoch, row)`` is called after each epoch (logging)."""
    device = pick_device(cfg.device)
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history: list[dict] = []
    start = 0
    if checkpoint and Path(checkpoint).exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            history, start = state["history"], state["epoch"] + 1
            for row in history:  # the new run gets the whole curve, not only the new epochs
                if on_epoch:
                    on_epoch(row["epoch"], row)
    step = model if not cfg.compile else torch.compile(model)
    images, masks = train
    amp = cfg.amp and device.type == "cuda"
    for epoch in range(start, epochs):
        gen = _seed_epoch(cfg.seed, epoch)
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, cfg)
        model.train()
        order = torch.randperm(len(images), generator=gen)
        total, seen = 0.0, 0
        batches = range(0, len(order), cfg.batch_size)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False, disable=not progress)
        for b in bar:
            idx = order[b:b + cfg.batch_size]
            x, y = images[idx].to(device, non_blocking=True), masks[idx].to(device, non_blocking=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(step(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)  # a device sync per batch; negligible next to the step
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        val = evaluate(model, valid[0], valid[1], cfg.batch_size, device)
        row = {"epoch": epoch, "lr": lr_at(epoch, cfg), "train_loss": total / seen,
               "valid_loss": val["loss"], "valid_accuracy": val["accuracy"],
               "valid_dice": val["dice"], "valid_jaccard": val["jaccard"],
               "valid_paper_dice": val["paper_dice"]}
        history.append(row)
        if checkpoint:
            with atomic_path(checkpoint) as tmp:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                            "history": history, "fingerprint": fingerprint}, tmp)
        if on_epoch:
            on_epoch(epoch, row)
        if progress:
            tqdm.write(f"epoch {epoch + 1}/{epochs}  train loss {row['train_loss']:.4f}  "
                       f"valid loss {row['valid_loss']:.4f}  valid dice {row['valid_dice']:.4f}")
    return history
