"""Training: lr schedule, resume from a checkpoint, safe weights files."""
from __future__ import annotations

import math
import pickle

import pytest
import torch

from mlsys.model import build_model
from mlsys.params import ModelParams, TrainParams
from mlsys.train import (CheckpointError, MODELS, epochs_for, load_weights, lr_at, save_weights,
                         train_model)


def tiny_data(n=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    y = (x[:, 0] > 0.6).long() + 2 * (x[:, 1] > 0.8).long()
    return x, y


def test_lr_schedule_matches_paper():
    cfg = TrainParams(lr=0.004, lr_decay=0.1, lr_step=10)
    assert lr_at(0, cfg) == lr_at(9, cfg) == 0.004
    assert lr_at(10, cfg) == pytest.approx(0.004 * math.exp(-0.1))
    assert lr_at(59, cfg) == pytest.approx(0.004 * math.exp(-0.5))
    assert epochs_for("model4", TrainParams(epochs=60)) == 20 and epochs_for("model2", TrainParams(epochs=60)) == 60
    assert MODELS["model4"] == ("clean", "method1", "method2")


class Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path):
    mcfg = ModelParams(base=4, depth=2)
    cfg = TrainParams(epochs=3, batch_size=3, lr=0.004, lr_step=1, device="cpu", seed=1)
    train, valid = tiny_data(), tiny_data(4, seed=1)

    torch.manual_seed(0)
    ref = build_model(mcfg)
    ref_hist = train_model(ref, train, valid, cfg, 3, progress=False)

    torch.manual_seed(0)
    model = build_model(mcfg)
    ckpt = tmp_path / "ckpt.pt"

    def stop_after_two(epoch, row):
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_model(model, train, valid, cfg, 3, ckpt, "fp", stop_after_two, progress=False)
    torch.manual_seed(123)                       # a fresh process: other random state
    resumed = build_model(mcfg)
    seen = []
    hist = train_model(resumed, train, valid, cfg, 3, ckpt, "fp", lambda e, r: seen.append(e), progress=False)
    assert seen == [0, 1, 2]                     # replayed history + the one new epoch
    assert [r["train_loss"] for r in hist] == [r["train_loss"] for r in ref_hist]
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k

    # another fingerprint (params or data changed): start over, do not resume
    other = build_model(mcfg)
    seen.clear()
    train_model(other, train, valid, cfg, 3, ckpt, "changed", lambda e, r: seen.append(e), progress=False)
    assert seen == [0, 1, 2]


def test_weights_roundtrip_and_mismatch(tmp_path):
    cfg = ModelParams(base=4, depth=2)
    model = build_model(cfg)
    save_weights(model, cfg, tmp_path / "m.pt")
    loaded = load_weights(tmp_path / "m.pt", cfg)
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(model.eval()(x), loaded.eval()(x))
    with pytest.raises(CheckpointError, match="differs in \\['base'\\]"):
        load_weights(tmp_path / "m.pt", ModelParams(base=8, depth=2))
    with pytest.raises(CheckpointError, match="do not exist"):
        load_weights(tmp_path / "none.pt", cfg)


class Evil:
    def __reduce__(self):
        return (open, ("/tmp/mlsys-pwned-marker", "w"))


def test_malicious_pickle_is_refused(tmp_path):
    marker = __import__("pathlib").Path("/tmp/mlsys-pwned-marker")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_weights(path, ModelParams(base=4, depth=2))
    assert not marker.exists()
