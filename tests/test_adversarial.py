"""The adversarial-training baselines (mlsys.adversarial): the inner attacks stay inside their
radius, the TRADES KL term is the hand-computed one, and the one training loop with the
identity transform is the clean loop bit for bit."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from mlsys import adversarial
from mlsys.model import build_model
from mlsys.params import BASELINES, AdversarialParams, ModelParams, Params, ParamsError, TrainParams, baseline_label
from mlsys.train import train_model

MCFG = ModelParams(base=4, depth=2)


def tiny_data(n=6, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    y = (x[:, 0] > 0.6).long() + 2 * (x[:, 1] > 0.8).long()
    return x, y


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model(MCFG)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_pgd_at_examples_stay_in_the_ball_and_raise_the_loss():
    model, (x, y) = tiny_model(), tiny_data()
    model.train()
    eps = 4 / 255
    adv = adversarial.pgd_examples(model, x, y, eps, 2.5 / 255, 3, torch.Generator().manual_seed(0))
    assert model.training, "the training loop gets its train mode back"
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() > eps / 2                       # it moved
    with torch.no_grad(), adversarial.eval_mode(model):
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)  # untargeted: away from the truth


@pytest.mark.parametrize("half_clean, attacked", [(True, 3), (False, 6)])
def test_pgd_at_batch_attacks_half_or_all(half_clean, attacked):
    model, (x, y) = tiny_model(), tiny_data(n=6)
    cfg = AdversarialParams(radius=4, steps=1, step_size=4, half_clean=half_clean)
    out = adversarial.pgdat_inputs(cfg)(model, x, y)
    moved = [(out[i] - x[i]).abs().max().item() for i in range(6)]
    assert all(m > 0 for m in moved[:attacked]) and all(m == 0 for m in moved[attacked:]), moved
    assert max(moved) <= 4 / 255 + 1e-6
    one = adversarial.pgdat_inputs(cfg)(model, x[:1], y[:1])
    assert (one - x[:1]).abs().max() > 0                          # a batch of one is attacked


def hand_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over images and pixels of sum_c p_c log(p_c / q_c), in plain Python floats."""
    n, c, h, w = p_logits.shape
    total = 0.0
    for i in range(n):
        for r in range(h):
            for s in range(w):
                pz = [float(v) for v in p_logits[i, :, r, s]]
                qz = [float(v) for v in q_logits[i, :, r, s]]
                p = [math.exp(v) / sum(math.exp(u) for u in pz) for v in pz]
                q = [math.exp(v) / sum(math.exp(u) for u in qz) for v in qz]
                total += sum(pc * math.log(pc / qc) for pc, qc in zip(p, q))
    return total / (n * h * w)


class OneByOne(torch.nn.Module):
    """A tiny segmentation model: a 1x1 convolution from 3 channels to 3 classes."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.5, -2.0], [-1.0, 0.5, 1.0]])[..., None, None])
            self.head.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))

    def forward(self, x):
        return self.head(x)


def test_trades_kl_term_is_the_hand_computation(monkeypatch):
    model = OneByOne()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 3, 4, generator=g)
    adv = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    y = torch.randint(0, 3, (2, 3, 4), generator=g)
    with torch.no_grad():
        kl = adversarial.pixel_kl(model(x), model(adv))
        expected = hand_kl(model(x), model(adv))
        assert kl.item() == pytest.approx(expected, rel=1e-5)
        assert adversarial.pixel_kl(model(x), model(x)).item() == pytest.approx(0, abs=1e-7)
        per_image = adversarial.pixel_kl(model(x), model(adv), per_image=True)
        assert per_image.tolist() == pytest.approx([hand_kl(model(x[i:i + 1]), model(adv[i:i + 1])) for i in range(2)],
                                                   rel=1e-5)
        # the TRADES objective: clean CE + beta * that KL, with x' the inner attack's
        monkeypatch.setattr(adversarial, "trades_examples", lambda *a, **k: adv)
        loss = adversarial.trades_loss(AdversarialParams(beta=6))(model, model, x, y)
        assert loss.item() == pytest.approx(F.cross_entropy(model(x), y).item() + 6 * expected, rel=1e-5)


def test_trades_examples_stay_in_the_ball_and_raise_the_kl():
    model, (x, _) = tiny_model(), tiny_data()
    model.train()
    eps = 4 / 255
    adv = adversarial.trades_examples(model, x, eps, 2.5 / 255, 2, 0.001, torch.Generator().manual_seed(0))
    assert model.training
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    start = (x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    with torch.no_grad(), adversarial.eval_mode(model):
        clean = model(x)
        assert adversarial.pixel_kl(clean, model(adv)) > 10 * adversarial.pixel_kl(clean, model(start))


def run(batch_loss=None, epochs=2):
    train, valid = tiny_data(8), tiny_data(4, seed=1)
    model = tiny_model(3)
    cfg = TrainParams(epochs=epochs, batch_size=4, lr=0.01, lr_step=1, device="cpu", seed=2, keep="last")
    kw = {} if batch_loss is None else {"batch_loss": batch_loss}
    return train_model(model, train, valid, cfg, epochs, progress=False, **kw), model.state_dict()


def test_identity_transform_is_the_clean_loop_bit_for_bit():
    hist, weights = run()
    hist_id, weights_id = run(adversarial.on_inputs(lambda model, x, y: x))
    assert hist == hist_id
    assert all(torch.equal(weights[k], weights_id[k]) for k in weights)


@pytest.mark.parametrize("name", list(BASELINES))
def test_baselines_train_reproducibly_and_differ_from_clean(name):
    cfg = AdversarialParams(steps=1)
    hist, weights = run(adversarial.batch_loss(name, cfg), epochs=1)
    again, weights2 = run(adversarial.batch_loss(name, cfg), epochs=1)
    assert hist == again and all(torch.equal(weights[k], weights2[k]) for k in weights)  # seeded per epoch
    clean, _ = run(epochs=1)
    assert math.isfinite(hist[0]["train_loss"]) and hist[0]["train_loss"] != clean[0]["train_loss"]


def test_settings_labels_and_checks():
    fields = {f.name for f in dataclasses.fields(AdversarialParams)}
    assert set(adversarial.FIELDS) == set(BASELINES)
    assert all(set(keys) <= fields for keys in adversarial.FIELDS.values())
    a = AdversarialParams()
    assert (a.radius, a.steps, a.beta, a.half_clean) == (4.0, 2, 6.0, True)
    assert baseline_label("pgdat", a) == "PGD-AT (2 steps, 4/255, half clean)"
    assert baseline_label("trades", a) == "TRADES (beta 6, 2 steps, 4/255)"
    assert baseline_label("pgdat", AdversarialParams(steps=1, half_clean=False)) == "PGD-AT (1 step, 4/255)"
    with pytest.raises(ParamsError, match="adversarial.steps = 0 is invalid"):
        Params(adversarial=AdversarialParams(steps=0)).validate()
    with pytest.raises(ValueError, match="unknown baseline"):
        adversarial.batch_loss("fgsm", a)
