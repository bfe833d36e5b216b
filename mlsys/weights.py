"""Weights files: a U-Net's plain state_dict and its model config, written atomically and
loaded without ever running code (``weights_only``). What train writes and augment,
evaluate and report load."""
from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import asdict

import torch

from .files import atomic_path
from .model import UNet, build_model
from .params import InputError, ModelParams


class CheckpointError(InputError, ValueError):
    """A weights file does not fit the configured model."""


# model config keys added after weights files were first written, with the value every
# older file holds (there was only the standard U-Net with He initialisation)
LEGACY_MODEL_CONFIG = {"variant": "standard", "init": "he"}


def save_weights(model: UNet, cfg: ModelParams, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Weights as a plain state_dict + config: loading them never runs code."""
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "config": asdict(cfg), "meta": meta or {}}, tmp)


def safe_load(path: str | os.PathLike, what: str, map_location="cpu"):
    """``torch.load(weights_only=True)``: tensors and plain containers only, so a file can
    never run code. A refused or unreadable file is a CheckpointError naming it."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} do not exist") from None
    except pickle.UnpicklingError as err:  # what the weights-only unpickler refused, in its words
        why = str(err).partition("WeightsUnpickler error:")[2].strip().split("\n")[0].split(". ")[0]
        raise CheckpointError(f"{what} {path} cannot be loaded safely: it holds more than tensors "
                              f"({why or 'not a weights-only pickle'}); refusing to unpickle it") from None
    except Exception as err:  # noqa: BLE001 - truncated or foreign files
        raise CheckpointError(f"{what} {path} cannot be loaded safely: not a readable torch file "
                              f"({str(err).splitlines()[0].split('. ')[0]})") from None


def load_weights(path: str | os.PathLike, cfg: ModelParams, map_location="cpu") -> UNet:
    """A U-Net of config ``cfg`` with the weights at ``path`` (``weights_only`` loading)."""
    blob = safe_load(path, "weights", map_location)
    if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict):
        raise CheckpointError(f"weights {path} are not an mlsys weights file")
    saved = blob.get("config", {})
    if saved:
        saved = {**LEGACY_MODEL_CONFIG, **saved}
    if saved and saved != asdict(cfg):
        diff = sorted(k for k, v in asdict(cfg).items() if saved.get(k) != v)
        raise CheckpointError(f"weights {path} were trained with "
                              + ", ".join(f"model.{k} = {saved.get(k)!r}" for k in diff)
                              + ", params.yaml says " + ", ".join(f"{getattr(cfg, k)!r}" for k in diff)
                              + f"; retrain or match the params (differs in {diff})")
    model = build_model(cfg)
    got, want = blob["state_dict"], model.state_dict()
    bad = ([f"missing {k}" for k in want if k not in got] + [f"unexpected {k}" for k in got if k not in want]
           + [f"{k} of shape {tuple(getattr(got[k], 'shape', ()))}" for k in want
              if k in got and getattr(got[k], "shape", None) != want[k].shape])
    if bad:
        raise CheckpointError(f"weights {path} do not fit the U-Net of the params: {len(bad)} tensors differ "
                              f"(e.g. {bad[0]})")
    model.load_state_dict(got)
    return model
