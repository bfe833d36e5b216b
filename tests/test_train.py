"""Training: lr schedule, resume from a checkpoint, safe weights files."""
from __future__ import annotations

import math
import pickle

import pytest
import torch

from mlsys.model import build_model
from mlsys.params import ModelParams, Params, ParamsError, TrainParams
from mlsys.params import MODELS
from mlsys.train import epochs_for, kept_epoch, lr_at, train_model
from mlsys.weights import CheckpointError, load_weights, save_weights


def tiny_data(n=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    y = (x[:, 0] > 0.6).long() + 2 * (x[:, 1] > 0.8).long()
    return x, y


def test_lr_schedule_keras_decays_before_epoch_0_and_step_from_lr_step():
    # keras: PokeNet.py's scheduler multiplies by e^-0.1 whenever the 0-based epoch % 10 == 0
    keras = TrainParams(lr=0.004, lr_decay=0.1, lr_step=10, schedule="keras")
    assert lr_at(0, keras) == lr_at(9, keras) == pytest.approx(0.004 * math.exp(-0.1)) == pytest.approx(0.0036193, abs=1e-7)
    assert lr_at(10, keras) == lr_at(19, keras) == pytest.approx(0.004 * math.exp(-0.2))
    assert lr_at(59, keras) == pytest.approx(0.004 * math.exp(-0.6))
    recurrence, lr = [], 0.004                  # the Keras callback's own recurrence, epoch by epoch
    for epoch in range(60):
        lr = lr * math.exp(-0.1) if epoch % 10 == 0 else lr
        recurrence.append(lr)
    assert [lr_at(e, keras) for e in range(60)] == pytest.approx(recurrence, rel=1e-12)
    step = TrainParams(lr=0.004, lr_decay=0.1, lr_step=10, schedule="step")
    assert lr_at(0, step) == lr_at(9, step) == 0.004
    assert lr_at(10, step) == pytest.approx(0.004 * math.exp(-0.1))
    assert lr_at(59, step) == pytest.approx(0.004 * math.exp(-0.5))
    assert TrainParams().schedule == "keras" and TrainParams().keep == "best"
    assert epochs_for("model4", TrainParams(epochs=60)) == 20 and epochs_for("model2", TrainParams(epochs=60)) == 60
    assert MODELS["model4"] == ("clean", "method1", "method2")


def test_kept_epoch_lowest_validation_loss_earliest_on_ties_or_last():
    rows = [{"epoch": e, "valid_loss": v} for e, v in enumerate([0.9, 0.5, 0.7, 0.5, 0.6])]
    assert kept_epoch(rows, "best") == 1        # ties -> earliest (Keras saves on a strict improvement)
    assert kept_epoch(rows, "last") == 4
    nan = [{"epoch": 0, "valid_loss": math.nan}, {"epoch": 1, "valid_loss": 0.8}, {"epoch": 2, "valid_loss": 0.9}]
    assert kept_epoch(nan, "best") == 1         # a NaN loss never counts as the best
    assert kept_epoch([{"epoch": 0, "valid_loss": math.nan}, {"epoch": 1, "valid_loss": math.inf}], "best") == 1
    assert kept_epoch(rows[3:], "best") == 3    # the epoch number of the row, not its position
    with pytest.raises(ValueError, match="history is empty"):
        kept_epoch([], "best")
    with pytest.raises(ValueError, match="keep = 'first' is unknown"):
        kept_epoch(rows, "first")


@pytest.mark.parametrize("key, value, expected", [
    ("schedule", "exp", 'train.schedule = \'exp\' is invalid; expected "keras" or "step"'),
    ("keep", "final", 'train.keep = \'final\' is invalid; expected "best" or "last"'),
])
def test_unknown_schedule_or_keep_is_a_params_error(key, value, expected):
    with pytest.raises(ParamsError, match=expected):
        Params(train=TrainParams(**{key: value})).validate()


# a tiny run whose validation loss is lowest at epoch 0 and rises after it (checked in the tests)
MCFG = ModelParams(base=4, depth=2, variant="original", init="he")  # He: epoch 0 is the best here


def best_first_run(keep: str, epochs: int = 3) -> TrainParams:
    return TrainParams(epochs=epochs, batch_size=3, lr=0.02, lr_step=1, device="cpu", seed=1, keep=keep)


def contradicting_data():
    """Validation labels that contradict the training rule: learning it raises the validation loss."""
    vx, vy = tiny_data(4, seed=1)
    return tiny_data(), (vx, (vy + 1) % 3)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("keep", ["best", "last"])
def test_training_ends_with_the_kept_weights(keep):
    train, valid = contradicting_data()
    torch.manual_seed(1)
    model = build_model(MCFG)
    per_epoch = {}
    hist = train_model(model, train, valid, best_first_run(keep), 3,
                       on_epoch=lambda e, r: per_epoch.update({e: snapshot(model)}), progress=False)
    losses = [r["valid_loss"] for r in hist]
    assert kept_epoch(hist, "best") == 0 < kept_epoch(hist, "last") == 2, losses  # the case is meaningful
    kept = kept_epoch(hist, keep)
    for k, v in model.state_dict().items():
        assert torch.equal(v, per_epoch[kept][k]), k
    assert not torch.equal(per_epoch[0]["head.weight"], per_epoch[2]["head.weight"])


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("keep", ["best", "last"])
def test_resume_equals_uninterrupted(tmp_path, keep):
    """Interrupted after epoch 1 of 3 and resumed: the same history and the same final weights,
    the kept ones (keep="best": epoch 0's, which only the checkpoint still holds)."""
    mcfg = MCFG
    cfg = best_first_run(keep)
    train, valid = contradicting_data()

    torch.manual_seed(0)
    ref = build_model(mcfg)
    ref_hist = train_model(ref, train, valid, cfg, 3, progress=False)
    assert kept_epoch(ref_hist, keep) == {"best": 0, "last": 2}[keep], [r["valid_loss"] for r in ref_hist]

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
    assert hist == ref_hist
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    # an interruption after the last epoch (before the stage wrote the weights): the same kept weights
    again = build_model(mcfg)
    assert train_model(again, train, valid, cfg, 3, ckpt, "fp", progress=False) == ref_hist
    for (k, a), b in zip(ref.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k

    # another fingerprint (params or data changed): start over, do not resume
    other = build_model(mcfg)
    seen.clear()
    train_model(other, train, valid, cfg, 3, ckpt, "changed", lambda e, r: seen.append(e), progress=False)
    assert seen == [0, 1, 2]


def test_checkpoint_without_the_best_weights_is_not_resumed_for_keep_best(tmp_path, capsys):
    """A checkpoint written by a keep="last" run cannot say which weights were best: start over."""
    train, valid = contradicting_data()
    ckpt = tmp_path / "ckpt.pt"

    def stop(epoch, row):
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_model(build_model(MCFG), train, valid, best_first_run("last"), 3, ckpt, "fp", stop, progress=False)
    seen = []
    hist = train_model(build_model(MCFG), train, valid, best_first_run("best"), 3, ckpt, "fp",
                       lambda e, r: seen.append(e), progress=False)
    assert seen == [0, 1, 2] and "lacks the best weights so far; starting over" in capsys.readouterr().out
    assert torch.load(ckpt, weights_only=True)["best"]["epoch"] == kept_epoch(hist, "best")


def test_weights_roundtrip_and_mismatch(tmp_path):
    cfg = ModelParams(base=4, depth=2, variant="standard", init="he")
    model = build_model(cfg)
    save_weights(model, cfg, tmp_path / "m.pt")
    loaded = load_weights(tmp_path / "m.pt", cfg)
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(model.eval()(x), loaded.eval()(x))
    with pytest.raises(CheckpointError, match="differs in \\['base'\\]"):
        load_weights(tmp_path / "m.pt", ModelParams(base=8, depth=2, variant="standard", init="he"))
    with pytest.raises(CheckpointError, match="do not exist"):
        load_weights(tmp_path / "none.pt", cfg)
    with pytest.raises(CheckpointError, match="model.variant = 'standard', params.yaml says 'original'"):
        load_weights(tmp_path / "m.pt", ModelParams(base=4, depth=2, variant="original", init="he"))


def test_weights_from_before_variant_and_init_load_as_the_standard_he_unet(tmp_path):
    """Files written before model.variant/model.init existed hold the standard U-Net with He init."""
    cfg = ModelParams(base=4, depth=2, variant="standard", init="he")
    model = build_model(cfg)
    old_config = {"base": 4, "depth": 2, "dropout": 0.2, "n_classes": 6}
    torch.save({"state_dict": model.state_dict(), "config": old_config, "meta": {}}, tmp_path / "old.pt")
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(load_weights(tmp_path / "old.pt", cfg).eval()(x), model.eval()(x))
    with pytest.raises(CheckpointError, match=r"model.init = 'he', params.yaml says 'glorot'.*differs in \['init'\]"):
        load_weights(tmp_path / "old.pt", ModelParams(base=4, depth=2, variant="standard", init="glorot"))
    with pytest.raises(CheckpointError, match=r"model.variant = 'standard', params.yaml says 'original'"):
        load_weights(tmp_path / "old.pt", ModelParams(base=4, depth=2, variant="original", init="he"))


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
