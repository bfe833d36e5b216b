"""Tests of the attacks (mlsys.attacks): FGSM's step and sign conventions, the two PGD
modes against hand-written loops, the eps-ball and [0, 1] bounds, the model's mode
and parameters left untouched, and a targeted attack that works on a trained model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlsys.attacks import attack_from_params, fast, fgsm, full_area, input_grad, logits_and_grad, pgd
from mlsys.model import UNet
from mlsys.params import AttackParams

SIZE = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture
def model():
    """A tiny untrained U-Net with dropout, so train vs eval mode changes its output."""
    torch.manual_seed(0)
    return UNet(n_classes=6, base=4, depth=2, dropout=0.5)


def images(n: int = 2, lo: float = 0.2, hi: float = 0.8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, 3, SIZE, SIZE, generator=g)


def edge_images(n: int = 2, seed: int = 2) -> torch.Tensor:
    """Values within 0.005 of 0 or 1, so a step of 0.05 gets clipped."""
    g = torch.Generator().manual_seed(seed)
    near = 0.005 * torch.rand(n, 3, SIZE, SIZE, generator=g)
    top = torch.rand(n, 3, SIZE, SIZE, generator=g) < 0.5
    return torch.where(top, 1 - near, near)


def eval_grad(model, x, target):
    """grad_x CE in eval mode (what the attacks use), the model's mode restored."""
    was = model.training
    model.eval()
    g = input_grad(model, x, target)
    model.train(was)
    return g


# --------------------------------------------------------------------------- FGSM
@pytest.mark.parametrize("targeted", [True, False])
def test_fgsm_step_is_exactly_eps_along_the_gradient_sign(model, targeted):
    x, eps = images(), 0.01
    target = full_area(x, 1)
    g = eval_grad(model, x, target)
    nonzero = g != 0
    assert nonzero.float().mean() > 0.9  # the check below covers almost every pixel
    adv = fgsm(model, x, target, eps, targeted=targeted)
    d = adv - x
    # targeted steps against the gradient (decrease the loss toward the target),
    # untargeted along it (increase the loss of the true mask)
    expected = -eps * g.sign() if targeted else eps * g.sign()
    torch.testing.assert_close(d, expected, atol=1e-6, rtol=0)
    assert torch.allclose(d.abs()[nonzero], torch.tensor(eps), atol=1e-6, rtol=0)
    assert (d[~nonzero] == 0).all()
    assert ((d * g)[nonzero] < 0).all() if targeted else ((d * g)[nonzero] > 0).all()


def test_fgsm_targeted_step_lowers_the_target_loss(model):
    x = images()
    target = full_area(x, 2)
    toward, away = fgsm(model, x, target, 0.01), fgsm(model, x, target, 0.01, targeted=False)
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(v), target) for v in (toward, x, away)]
    assert losses[0] < losses[1] < losses[2]


def test_attacks_work_inside_no_grad(model):
    """Evaluation code often runs under torch.no_grad(); the attacks need their own graph."""
    x = images()
    target = full_area(x, 1)
    want = [fgsm(model, x, target, 0.01), pgd(model, x, target, mode="faithful", eps=0.01, steps=2)]
    with torch.no_grad():
        got = [fgsm(model, x, target, 0.01), pgd(model, x, target, mode="faithful", eps=0.01, steps=2)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("targeted", [True, False])
def test_fgsm_stays_in_unit_box_and_within_eps_when_clipping(model, targeted):
    x, eps = edge_images(), 0.05
    target = full_area(x, 0)
    adv = fgsm(model, x, target, eps, targeted=targeted)
    g = eval_grad(model, x, target)
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= eps + 1e-6
    expected = (x - eps * g.sign() if targeted else x + eps * g.sign()).clamp(0, 1)
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)
    # clipping did happen: some pixels with a non-zero gradient moved less than eps
    assert ((adv - x).abs() < eps - 1e-3)[g != 0].any()


# --------------------------------------------------------------------------- standard PGD
@pytest.mark.parametrize("random_start", [False, True])
@pytest.mark.parametrize("make", [images, edge_images])
def test_standard_pgd_stays_in_eps_ball_and_unit_box(model, random_start, make):
    x, eps = make(), 0.03
    adv = pgd(model, x, full_area(x, 1), mode="standard", eps=eps, alpha=0.01, steps=8,
              random_start=random_start, generator=torch.Generator().manual_seed(0))
    linf = (adv - x).abs().amax()
    assert linf <= eps + 1e-6
    assert linf >= eps - 1e-3  # 8 steps of 0.01 reach the ball's boundary somewhere
    assert adv.min() >= 0 and adv.max() <= 1


def test_standard_pgd_equals_projected_loop(model):
    x, eps, alpha, steps = images(), 0.02, 0.008, 6
    target = full_area(x, 3)
    model.eval()
    ref = x.clone()
    for _ in range(steps):
        xr = ref.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xr), target), xr)
        ref = ref - alpha * g.sign()
        ref = torch.min(torch.max(ref, x - eps), x + eps).clamp(0, 1)
    adv = pgd(model, x, target, mode="standard", eps=eps, alpha=alpha, steps=steps)
    torch.testing.assert_close(adv, ref, atol=1e-6, rtol=0)


def test_standard_pgd_random_start_is_seeded(model):
    x, eps = images(), 0.03
    target = full_area(x, 1)

    def run(seed, steps=3):
        return pgd(model, x, target, mode="standard", eps=eps, alpha=0.01, steps=steps,
                   random_start=True, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    start = run(5, steps=0)  # the random start alone: inside the ball, not the clean image
    assert (start - x).abs().max() <= eps + 1e-6
    assert (start - x).abs().mean() > eps / 4
    plain = pgd(model, x, target, mode="standard", eps=eps, alpha=0.01, steps=0)
    assert torch.equal(plain, x)


# --------------------------------------------------------------------------- faithful mode
def test_faithful_equals_iterated_fgsm_without_projection(model):
    x, eps, steps = images(), 0.01, 5
    target = full_area(x, 0)
    model.train()  # the attack must evaluate the model regardless
    adv = pgd(model, x, target, mode="faithful", eps=eps, steps=steps)
    model.eval()
    ref = x.clone()
    for _ in range(steps):
        xr = ref.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xr), target), xr)
        ref = (ref - eps * g.sign()).clamp(0, 1)
    torch.testing.assert_close(adv, ref, atol=1e-6, rtol=0)
    assert (adv - x).abs().max() > eps + 1e-4  # no projection: eps is a per-step size
    assert (adv - x).abs().max() <= steps * eps + 1e-5
    # alpha and random_start are standard-mode settings; faithful ignores them
    same = pgd(model, x, target, mode="faithful", eps=eps, steps=steps, alpha=0.5,
               random_start=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same, adv)


def test_untargeted_faithful_raises_the_true_mask_loss(model):
    x = images()
    y = torch.randint(0, 6, (2, SIZE, SIZE), generator=torch.Generator().manual_seed(3))
    adv = pgd(model, x, y, mode="faithful", eps=0.01, steps=3, targeted=False)
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


# --------------------------------------------------------------------------- side effects
@pytest.mark.parametrize("training", [True, False])
def test_attacks_restore_mode_and_leave_parameters_alone(model, training):
    x = images()
    target = full_area(x, 1)
    params = [p.detach().clone() for p in model.parameters()]
    model.train(training)
    a = fgsm(model, x, target, 0.01)
    assert all(m.training == training for m in model.modules())
    b = pgd(model, x, target, mode="faithful", eps=0.01, steps=2)
    assert all(m.training == training for m in model.modules())
    c = pgd(model, x, target, mode="standard", eps=0.02, alpha=0.01, steps=2, random_start=True)
    assert all(m.training == training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert not (a.requires_grad or b.requires_grad or c.requires_grad)
    # evaluated with dropout off: the same result whatever mode the model was in
    model.eval()
    assert torch.equal(a, fgsm(model, x, target, 0.01))
    assert torch.equal(b, pgd(model, x, target, mode="faithful", eps=0.01, steps=2))


def test_unknown_mode_is_rejected(model):
    x = images()
    with pytest.raises(ValueError, match="bogus"):
        pgd(model, x, full_area(x, 0), mode="bogus")


# --------------------------------------------------------------------------- it works
def test_targeted_attack_drives_a_trained_model_to_background():
    """The paper's evaluation attack (faithful, full-area background) on a micro model
    trained briefly on synthetic patches: most nucleus predictions turn background."""
    from mlsys.prepare import normalise_images, semantic_masks
    from mlsys.synthetic import generate

    raw_images, raw_masks, _ = generate(8, SIZE, 0, progress=False)
    x = torch.from_numpy(normalise_images(raw_images, "minmax"))
    y = torch.from_numpy(semantic_masks(raw_masks)).long()
    torch.manual_seed(0)
    net = UNet(n_classes=6, base=4, depth=2, dropout=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    net.zero_grad(set_to_none=True)
    net.eval()
    with torch.no_grad():
        clean = net(x).argmax(1)
    assert (clean == y).float().mean() > 0.8  # it learned something
    before = (clean == 0).float().mean()
    assert before < 0.95  # it predicts nuclei on some pixels
    adv = pgd(net, x, full_area(x, 0), mode="faithful", eps=0.01, steps=10)
    with torch.no_grad():
        after = (net(adv).argmax(1) == 0).float().mean()
    # at least half of the pixels not yet predicted background now are
    assert after >= before + 0.5 * (1 - before)


# --------------------------------------------------------------------------- fast paths
@pytest.mark.parametrize("training", [True, False])
def test_fast_forward_computes_the_plain_function_and_keeps_the_mode(model, training):
    """Channels-last inputs: the same logits and input gradient as the plain model (float
    order only); the model's mode and weights as
    they were after an attack through the wrapper."""
    model.train(training)
    x = images(3)
    target = full_area(x, 2)
    net = fast(model, channels_last=True)
    assert net.head is model.head and net.training == training
    with torch.no_grad():
        before = [p.clone() for p in model.parameters()]
    model.eval()
    plain = logits_and_grad(model, x, lambda z: F.cross_entropy(z, target))
    got = logits_and_grad(fast(model, channels_last=True), x, lambda z: F.cross_entropy(z, target))
    model.train(training)
    torch.testing.assert_close(got[0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], plain[1], atol=1e-7, rtol=1e-4)
    cfg = AttackParams(steps=2, channels_last=True)
    attack_from_params(model, x, cfg, 0)
    assert model.training == training
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.is_contiguous() for p in model.parameters())
    assert fast(model) is model


def test_bf16_attack_follows_the_fp32_gradient(model):
    """amp on the CPU: the bf16-autocast gradient points the way of the fp32 one (most
    signs agree), and the bf16 attack lowers the target loss as the fp32 one does."""
    model.eval()
    x = images(4)
    target = full_area(x, 3)
    g32 = input_grad(model, x, target)
    g16 = input_grad(model, x, target, amp=True)
    assert (g32.sign() == g16.sign()).float().mean() > 0.9
    loss = lambda adv: F.cross_entropy(model(adv), target).item()  # noqa: E731
    with torch.no_grad():
        start = loss(x)
        for amp in (False, True):
            adv = attack_from_params(model, x, AttackParams(steps=5, eps=0.01, amp=amp, target=3), 3)
            assert loss(adv) < start - 0.01, amp


@pytest.mark.slow
def test_compiled_attack_equals_the_plain_one(model):
    """torch.compile'd attack loop (CPU inductor: tens of seconds to compile)."""
    model.eval()
    x = images(2)
    plain = attack_from_params(model, x, AttackParams(steps=3, channels_last=False), 1)
    got = attack_from_params(model, x, AttackParams(steps=3, channels_last=True, compile=True), 1)
    assert ((got - plain).abs() > 1e-5).float().mean() <= 0.001
