"""Tests of the field's untargeted attacks (mlsys.attacks: segpgd, cospgd, apgd with
SEA's losses and radius schedule, worst_case, sea) and of the on_step curves.

Each attack is compared with a plain loop written here from the paper's equations
(none of mlsys.attacks' helpers is used by the references); the losses' weights are
checked on hand-made logits; and every attack stays in the eps-ball and [0, 1],
restores the model's mode, and reports its own forwards through on_step."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlsys.attacks import pgd
from mlsys.robust import SEA_LOSSES, SEA_SCHEDULE, apgd, apgd_checkpoints, balanced_masked_ce, cosine_distance, cospgd, cospgd_loss, greedy_worst_miou, image_ce, inverse_frequency, js_divergence, masked_ce, padam, sea, segpgd, segpgd_loss, untargeted, worst_case
from mlsys.model import UNet

SIZE, CLASSES = 16, 6

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def unet(seed: int = 0, dropout: float = 0.0) -> UNet:
    torch.manual_seed(seed)
    return UNet(n_classes=CLASSES, base=4, depth=2, dropout=dropout).eval()


@pytest.fixture
def model():
    return unet()


def batch(model, n: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0.1, 0.9] and 'true' masks: the model's clean prediction with a
    random quarter of the pixels relabelled, so some pixels start out wrong."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 + 0.8 * torch.rand(n, 3, SIZE, SIZE, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    flip = torch.rand(y.shape, generator=g) < 0.25
    y = torch.where(flip, torch.randint(0, CLASSES, y.shape, generator=g), y)
    return x, y


def accuracy(model, x, y) -> torch.Tensor:
    """Pixel accuracy per image, written out here."""
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean(dim=(1, 2))


def noise(shape, seed: int) -> torch.Tensor:
    """The uniform start's draw: U(-1, 1) from a seeded CPU generator."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------- plain references
def ce_map(logits, y):
    """-log softmax(logits)_y per pixel (N, H, W)."""
    return -torch.gather(torch.log_softmax(logits, 1), 1, y.unsqueeze(1)).squeeze(1)


def reference_weighted_pgd(model, x, y, eps, alpha, steps, weight_of, start):
    """PGD on sum_j w_j CE_j / (HW): x <- clip(clip(x + alpha sign(grad), x - eps, x + eps), 0, 1);
    weight_of(logits, y, paper_t, T) gives the detached pixel weights (N, H, W)."""
    adv = start.clone()
    for paper_t in range(1, steps + 1):  # the papers count iterations from 1
        xr = adv.clone().requires_grad_(True)
        logits = model(xr)
        w = weight_of(logits.detach(), y, paper_t, steps)
        loss = (w * ce_map(logits, y)).sum() / (SIZE * SIZE)
        (g,) = torch.autograd.grad(loss, xr)
        adv = torch.clamp(adv + alpha * g.sign(), x - eps, x + eps).clamp(0, 1)
    return adv


def segpgd_weights(logits, y, paper_t, T):
    """Gu et al.: (1 - lambda) on correctly, lambda on wrongly classified pixels,
    lambda = (t - 1) / (2T)."""
    lam = (paper_t - 1) / (2 * T)
    right = logits.argmax(1) == y
    return right.float() * (1 - lam) + (~right).float() * lam


def cospgd_weights(logits, y, paper_t, T):
    """Agnihotri & Keuper: cos(softmax(logits), onehot(y)) = p_y / ||p||_2."""
    p = torch.softmax(logits, 1)
    p_y = torch.gather(p, 1, y.unsqueeze(1)).squeeze(1)
    return p_y / p.pow(2).sum(1).sqrt()


def code_checkpoints(n_iter):
    """The update counts at which the authors' apgd_train checks its step, written as their
    loop runs: counter3 += 1 after each update; at counter3 == k a check, then counter3 = 0
    and k = max(k - size_decr, n_iter_min)."""
    k, n_min, decr = max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
    counter, out = 0, []
    for i in range(n_iter):
        counter += 1
        if counter == k:
            out.append(i + 1)
            counter, k = 0, max(k - decr, n_min)
    return out


def reference_apgd_one(model, x, y, eps, stages, attack_loss, tracked_loss, start):
    """APGD for ONE image x (1, 3, H, W), stage by stage (radius, iterations), written after
    apgd_train of nmndeep/Robust-Segmentation (semseg/attacker.py) line by line: a zero
    loss buffer ``loss_steps`` read by check_oscillation (index -1 wraps, as in torch), the
    step halved where the rises in the window are <= 0.75 k or (not reduced at the last
    check and loss_best_last_check >= loss_best; reduced_last_check starts at 1), the
    restart x_adv <- x_best, grad <- grad_best with x_adv_old untouched, a = 1 then 0.75.
    Keeps the lowest-accuracy iterate (x_best_adv); the next stage starts from it, projected."""
    def evaluate(z, need_grad):
        zr = z.clone().requires_grad_(need_grad)
        with torch.set_grad_enabled(need_grad):
            logits = model(zr)
            g = torch.autograd.grad(attack_loss(logits, y), zr)[0] if need_grad else None
        logits = logits.detach()
        return g, tracked_loss(logits, y).item(), (logits.argmax(1) == y).float().mean().item()

    point = start
    etas = []
    for r, n_iter in stages:
        def proj(z):
            return torch.clamp(torch.min(torch.max(z, x - r), x + r), 0.0, 1.0)

        x_adv = proj(point)
        grad, loss_best, acc = evaluate(x_adv, n_iter > 0)
        x_best_adv, x_best, grad_best = x_adv, x_adv, grad
        step = 2.0 * r
        k = max(int(0.22 * n_iter), 1)
        n_min, decr = max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
        loss_steps = [0.0] * n_iter
        counter3, reduced_last_check, loss_best_last_check = 0, True, loss_best
        x_adv_old = x_adv
        for i in range(n_iter):
            grad2 = x_adv - x_adv_old
            x_adv_old = x_adv
            a = 0.75 if i > 0 else 1.0
            x_adv_1 = proj(x_adv + step * torch.sign(grad))
            x_adv = proj(x_adv + (x_adv_1 - x_adv) * a + grad2 * (1 - a))
            etas.append(step)
            g, y1, avg_acc = evaluate(x_adv, i < n_iter - 1)
            if g is not None:
                grad = g
            if avg_acc <= acc:
                x_best_adv = x_adv
            acc = min(acc, avg_acc)
            loss_steps[i] = y1
            if y1 > loss_best:
                x_best, grad_best, loss_best = x_adv, grad, y1
            counter3 += 1
            if counter3 == k:
                t = sum(float(loss_steps[i - c] > loss_steps[i - c - 1]) for c in range(k))
                fl_osc = t <= k * 0.75
                fl_no_impr = (not reduced_last_check) and loss_best_last_check >= loss_best
                reduced_last_check = fl_osc or fl_no_impr
                loss_best_last_check = loss_best
                if reduced_last_check:
                    step /= 2.0
                    x_adv, grad = x_best, grad_best
                counter3, k = 0, max(k - decr, n_min)
        point = x_best_adv
    return point, etas


def reference_apgd(model, x, y, eps, steps, schedule, attack_loss, tracked_loss, start):
    """reference_apgd_one image by image; stage lengths int(share * steps), the rest last
    (apgd_largereps: [int(c * n_iter) for c in (0.3, 0.3)], the rest at eps)."""
    lengths = [int(share * steps) for share, _ in schedule[:-1]]
    lengths.append(steps - sum(lengths))
    stages = [(mult * eps, n) for (_, mult), n in zip(schedule, lengths)]
    outs, etas = [], []
    for i in range(x.shape[0]):
        adv, e = reference_apgd_one(model, x[i:i + 1], y[i:i + 1], eps, stages, attack_loss, tracked_loss,
                                    start[i:i + 1])
        outs.append(adv)
        etas.append(e)
    return torch.cat(outs), torch.tensor(etas).T  # (steps, N)


def ref_ce(logits, y):
    return ce_map(logits, y).mean()


def ref_masked_ce(logits, y):
    right = (logits.argmax(1) == y).float()
    return (right * ce_map(logits, y)).mean()


# --------------------------------------------------------------------------- equal to the references
@pytest.mark.parametrize("random_start", [False, True])
def test_segpgd_equals_the_paper_loop(model, random_start):
    x, y = batch(model)
    eps, alpha, steps = 0.03, 0.01, 6
    start = (x + eps * noise(x.shape, 4)).clamp(0, 1) if random_start else x
    want = reference_weighted_pgd(model, x, y, eps, alpha, steps, segpgd_weights, start)
    got = segpgd(model, x, y, eps, alpha, steps, random_start=random_start,
                 generator=torch.Generator().manual_seed(4))
    assert torch.equal(got, want)
    # the weighting matters: plain CE (weights 1) gives another image
    plain = reference_weighted_pgd(model, x, y, eps, alpha, steps, lambda *a: torch.ones(y.shape), start)
    assert not torch.equal(got, plain)


@pytest.mark.parametrize("random_start", [False, True])
def test_cospgd_equals_the_paper_loop(model, random_start):
    x, y = batch(model)
    eps, alpha, steps = 0.03, 0.01, 6
    start = (x + eps * noise(x.shape, 5)).clamp(0, 1) if random_start else x
    want = reference_weighted_pgd(model, x, y, eps, alpha, steps, cospgd_weights, start)
    got = cospgd(model, x, y, eps, alpha, steps, random_start=random_start,
                 generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, want)


def test_apgd_equals_the_authors_loop(model):
    x, y = batch(model)
    eps, steps = 0.03, 20
    got, trace = apgd(model, x, y, eps, steps, return_trace=True)
    want, etas = reference_apgd(model, x, y, eps, steps, ((1.0, 1.0),), ref_ce, ref_ce, x)
    assert torch.equal(got, want)
    torch.testing.assert_close(trace["eta"], etas.float(), rtol=0, atol=0)


def test_apgd_with_sea_schedule_and_masked_ce_equals_the_authors_loop(model):
    x, y = batch(model, seed=2)
    eps, steps = 0.02, 20
    start = (x + 2 * eps * noise(x.shape, 6)).clamp(0, 1)  # uniform in the first (2 eps) ball
    got, trace = apgd(model, x, y, eps, steps, loss_fn=masked_ce, track_fn=image_ce, schedule=SEA_SCHEDULE,
                      random_start=True, generator=torch.Generator().manual_seed(6), return_trace=True)
    want, etas = reference_apgd(model, x, y, eps, steps, SEA_SCHEDULE, ref_masked_ce, ref_ce, start)
    assert torch.equal(got, want)
    torch.testing.assert_close(trace["eta"], etas.float(), rtol=0, atol=0)
    # 30% / 30% / 40% of the updates at 2 eps, 1.5 eps, eps
    assert trace["radius"].tolist() == pytest.approx([2 * eps] * 6 + [1.5 * eps] * 6 + [eps] * 8)


def test_checkpoints_are_the_codes_integer_windows():
    """Worked by hand from apgd_train: k0 = max(int(0.22 n), 1), decr = max(int(0.03 n), 1),
    k_min = max(int(0.06 n), 1); windows k0, max(k0 - decr, k_min), ...; a check where a
    window ends at or before update n.
      n = 4:   0.88 -> k0 = 1; 0.12 -> decr 1; 0.24 -> k_min 1: windows 1, 1, 1, 1 -> 1, 2, 3, 4.
      n = 30:  6.6 -> 6; 0.8999... -> 1; 1.7999... -> 1: windows 6, 5, 4, 3, 2, 1, 1, ...
               -> 6, 11, 15, 18, 20, then every update 21 .. 30.
      n = 100: 22.000000000000004 -> 22; 3 ; 6: windows 22, 19, 16, 13, 10, 7, 6, 6
               -> 22, 41, 57, 70, 80, 87, 93, 99 (105 > 100).
      n = 300: 66; 9; 18: windows 66, 57, 48, 39, 30, 21, 18, 18
               -> 66, 123, 171, 210, 240, 261, 279, 297 (315 > 300).
    (The paper's ceil(p_j n) differs: n = 30 would give 7, 13, 18, 21, 24, 26, 28, 30.)"""
    assert apgd_checkpoints(4) == [1, 2, 3, 4]
    assert apgd_checkpoints(30) == [6, 11, 15, 18, 20] + list(range(21, 31))
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(300) == [66, 123, 171, 210, 240, 261, 279, 297]
    for n in (0, 1, 2, 3, 7, 10, 20, 33, 90, 120, 299, 301, 1000):
        assert apgd_checkpoints(n) == code_checkpoints(n), n


# --------------------------------------------------------------------------- the losses' weights
def test_segpgd_loss_weights_are_the_papers():
    # one image, 4 pixels, 3 classes: pixels 0, 1 classified right, 2, 3 wrong
    logits = torch.tensor([[[[2.0, 0.1, 0.3, -1.0]], [[0.5, 1.5, 2.0, 0.0]], [[-1.0, 0.2, 0.1, 1.0]]]])
    y = torch.tensor([[[0, 1, 0, 1]]])
    ce = [-(logits[0, y[0, 0, j], 0, j] - torch.logsumexp(logits[0, :, 0, j], 0)).item() for j in range(4)]
    T = 4
    for t in range(T):  # 0-based update t is the paper's t + 1: lambda = t / (2T)
        lam = ((t + 1) - 1) / (2 * T)
        want = ((1 - lam) * (ce[0] + ce[1]) + lam * (ce[2] + ce[3])) / 4
        assert segpgd_loss(logits, y, t, T).item() == pytest.approx(want, rel=1e-6)
    assert segpgd_loss(logits, y, 0, T).item() == pytest.approx((ce[0] + ce[1]) / 4, rel=1e-6)  # lambda_1 = 0
    assert segpgd_loss(logits, y, T - 1, T).item() == pytest.approx(  # lambda_T = (T-1)/(2T) < 1/2
        ((T + 1) * (ce[0] + ce[1]) + (T - 1) * (ce[2] + ce[3])) / (2 * T) / 4, rel=1e-6)


def test_cospgd_loss_weights_are_the_papers_and_carry_no_gradient():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])  # two pixels
    logits = probs.log().T.reshape(1, 3, 1, 2).clone().requires_grad_(True)
    y = torch.tensor([[[0, 1]]])
    cos = [0.7 / math.sqrt(0.49 + 0.04 + 0.01), 0.3 / math.sqrt(0.01 + 0.09 + 0.36)]
    ce = [-math.log(0.7), -math.log(0.3)]
    loss = cospgd_loss(logits, y, 0, 1)
    assert loss.item() == pytest.approx((cos[0] * ce[0] + cos[1] * ce[1]) / 2, rel=1e-6)
    (g,) = torch.autograd.grad(loss.sum(), logits)
    # d/dlogits of sum_j cos_j CE_j / 2 with cos_j constant: cos_j (softmax - onehot) / 2
    want = torch.stack([cos[j] * (probs[j] - F.one_hot(y[0, 0, j], 3).float()) / 2 for j in range(2)], 1)
    torch.testing.assert_close(g[0, :, 0, :], want, atol=1e-6, rtol=1e-5)


def test_sea_losses_on_hand_made_logits():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    logits = probs.log().T.reshape(1, 3, 2, 2)
    y = torch.tensor([[[0, 1], [0, 2]]])  # pixel 1 wrong (argmax 2), the others right
    ce = [-math.log(probs[j, y.flatten()[j]].item()) for j in range(4)]
    right = [1, 0, 1, 1]
    assert image_ce(logits, y).item() == pytest.approx(sum(ce) / 4, rel=1e-6)
    assert masked_ce(logits, y).item() == pytest.approx(sum(r * c for r, c in zip(right, ce)) / 4, rel=1e-6)
    w = torch.tensor([0.5, 2.0, 3.0])
    want = sum(r * w[k].item() * c for r, k, c in zip(right, y.flatten().tolist(), ce)) / 4
    assert balanced_masked_ce(logits, y, w).item() == pytest.approx(want, rel=1e-6)
    # per-image weights: class counts 2, 1, 1 -> 1/2, 1, 1 normalised: 0.2, 0.4, 0.4
    own = [0.2, 0.4, 0.4]
    want = sum(r * own[k] * c for r, k, c in zip(right, y.flatten().tolist(), ce)) / 4
    assert balanced_masked_ce(logits, y).item() == pytest.approx(want, rel=1e-6)
    # JS(p, q) = (KL(p || m) + KL(q || m)) / 2, m = (p + q) / 2, q = onehot(y), 0 log 0 = 0
    js = []
    for j in range(4):
        p, q = probs[j], F.one_hot(y.flatten()[j], 3).float()
        m = (p + q) / 2
        kl = [sum(a * math.log(a / b) for a, b in zip(u.tolist(), m.tolist()) if a > 0) for u in (p, q)]
        js.append((kl[0] + kl[1]) / 2)
    assert js_divergence(logits, y).item() == pytest.approx(sum(js) / 4, rel=1e-5)
    assert max(js) < math.log(2)


# --------------------------------------------------------------------------- bounds and behaviour
def edge_batch(model, n: int = 2, seed: int = 3):
    """Values within 0.005 of 0 or 1, so steps get clipped to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    near = 0.005 * torch.rand(n, 3, SIZE, SIZE, generator=g)
    x = torch.where(torch.rand(n, 3, SIZE, SIZE, generator=g) < 0.5, 1 - near, near)
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


ATTACKS = {
    "segpgd": lambda m, x, y, eps, on_step=None: segpgd(m, x, y, eps, eps / 3, 6, generator=torch.Generator()
                                                        .manual_seed(0), on_step=on_step),
    "cospgd": lambda m, x, y, eps, on_step=None: cospgd(m, x, y, eps, eps / 3, 6, generator=torch.Generator()
                                                        .manual_seed(0), on_step=on_step),
    "apgd": lambda m, x, y, eps, on_step=None: apgd(m, x, y, eps, 6, on_step=on_step),
    "apgd-sea": lambda m, x, y, eps, on_step=None: apgd(m, x, y, eps, 10, loss_fn=js_divergence, track_fn=image_ce,
                                                        schedule=SEA_SCHEDULE, random_start=True,
                                                        generator=torch.Generator().manual_seed(0), on_step=on_step),
    "sea": lambda m, x, y, eps, on_step=None: sea(m, x, y, eps, 10, generator=torch.Generator().manual_seed(0))[0],
    "padam-ce": lambda m, x, y, eps, on_step=None: padam(m, x, y, eps, 6, generator=torch.Generator().manual_seed(0),
                                                         on_step=on_step),
    "padam-cos": lambda m, x, y, eps, on_step=None: padam(m, x, y, eps, 6, loss_fn=cosine_distance,
                                                          generator=torch.Generator().manual_seed(0), on_step=on_step),
}


@pytest.mark.parametrize("name", list(ATTACKS))
@pytest.mark.parametrize("make", [batch, edge_batch])
def test_attacks_stay_in_the_eps_ball_and_unit_box(model, name, make):
    x, y = make(model)
    eps = 0.05
    adv = ATTACKS[name](model, x, y, eps)
    assert adv.shape == x.shape and not adv.requires_grad
    linf = (adv - x).abs().amax()
    assert linf <= eps + 1e-6
    assert linf > eps / 4  # it moved
    assert adv.min() >= 0 and adv.max() <= 1


@pytest.mark.parametrize("name", list(ATTACKS))
@pytest.mark.parametrize("training", [True, False])
def test_attacks_restore_mode_and_leave_parameters_alone(name, training):
    net = unet(dropout=0.5)
    x, y = batch(net.eval())
    params = [p.detach().clone() for p in net.parameters()]
    net.train(training)
    adv = ATTACKS[name](net, x, y, 0.03)
    assert all(m.training == training for m in net.modules())
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), params))
    net.eval()  # evaluated with dropout off: the same result whatever mode the model was in
    assert torch.equal(adv, ATTACKS[name](net, x, y, 0.03))


def test_attacks_lower_the_pixel_accuracy(model):
    x, y = batch(model)
    clean = accuracy(model, x, y)
    for name, attack in ATTACKS.items():
        assert (accuracy(model, attack(model, x, y, 0.05), y) < clean).all(), name


def test_random_starts_are_seeded(model):
    x, y = batch(model)

    def run(fn, seed):
        return fn(model, x, y, 0.03, 0.01, 3, generator=torch.Generator().manual_seed(seed))

    for fn in (segpgd, cospgd):
        assert torch.equal(run(fn, 7), run(fn, 7))
        assert not torch.equal(run(fn, 7), run(fn, 8))
    a, b, c = (apgd(model, x, y, 0.03, 5, random_start=True, generator=torch.Generator().manual_seed(s))
               for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    for loss in (image_ce, cosine_distance):  # PAdam: deterministic given the generator
        a, b, c = (padam(model, x, y, 0.03, 4, loss_fn=loss, generator=torch.Generator().manual_seed(s))
                   for s in (7, 7, 8))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_apgd_halves_its_step_at_checkpoints_only(model):
    x, y = batch(model)
    eps, steps = 0.03, 30
    _, trace = apgd(model, x, y, eps, steps, return_trace=True)
    eta = trace["eta"]  # (steps, N): the step of each update
    assert eta.shape == (steps, x.shape[0])
    assert torch.allclose(eta[0], torch.tensor(2 * eps))
    checks = set(apgd_checkpoints(steps))
    assert trace["checkpoints"] == sorted(checks)
    for k in range(1, steps):
        changed = eta[k] != eta[k - 1]
        if k not in checks:  # update k follows update k-1 without a check between them
            assert not changed.any()
        else:
            torch.testing.assert_close(eta[k][changed], eta[k - 1][changed] / 2, rtol=0, atol=0)
    assert (eta[-1] < 2 * eps).all()  # every image's step was halved at least once
    assert (eta[-1] <= eps / 2 + 1e-9).any()  # some more than once


def test_apgd_step_rules_on_a_scripted_loss(model):
    """100 updates, one stage, r = 0.03: checkpoints 22, 41, 57, 70, 80, 87, 93, 99 (windows
    22, 19, 16, 13, 10, 7, 6, 6). The tracked loss (injected) is scripted; f_0 = 100 at the
    start, so the best loss stays 100 until update 58. Derived by hand from apgd_train /
    check_oscillation (rises counted with '>', halving where rises <= 0.75 k):
      22: updates 1..17 are 1..17, 18..22 fall 16..12. Update 1 is compared with the
          zero-filled buffer (1 > 0: a rise), not with f_0 = 100: 17 rises > 16.5, keep.
          (Compared with f_0 it would be 16 <= 16.5: halve.) The best did not grow (100),
          but condition 2 is not applied at the first check: keep eta = 0.06.
      41: 23..37 are 13..27 (23 vs 12: 15 rises), 38..41 fall 26..23: 15 > 14.25, yet not
          halved at 22 and best 100 >= 100: condition 2 halves -> 0.03; restart at the best
          point (the start), the next update compared with 23 (the buffer is not reset).
      57: 42..53 are 24..35 (42 vs 23: a rise; 12 rises), 54..57 fall: 12 <= 0.75 * 16 = 12
          exactly: condition 1 halves -> 0.015 ('<=', the paper's "fewer than" would keep).
      70: 58..67 are 101..110 (10 rises, the best grows to 110), 68..70 fall: 10 > 9.75 and
          halved at 57 (no condition 2): keep 0.015.
      80: 71 is 1 (a fall), 72..79 are 2..9 (8 rises), 80 is 8: 8 > 7.5, but not halved at 70
          and best 110 >= 110: condition 2 halves -> 0.0075.
      87, 93, 99: 81..100 are all -100, no rise: condition 1 halves each time
          -> 0.00375 (88..93), 0.001875 (94..99), 0.0009375 (100)."""
    x, y = batch(model, n=1)
    values = [100.0]                                                           # f_0, the start
    values += [float(v) for v in range(1, 18)] + [16.0, 15.0, 14.0, 13.0, 12.0]   # updates 1..22
    values += [float(v) for v in range(13, 28)] + [26.0, 25.0, 24.0, 23.0]        # 23..41
    values += [float(v) for v in range(24, 36)] + [34.0, 33.0, 32.0, 31.0]        # 42..57
    values += [float(v) for v in range(101, 111)] + [109.0, 108.0, 107.0]         # 58..70
    values += [1.0] + [float(v) for v in range(2, 10)] + [8.0]                    # 71..80
    values += [-100.0] * 20                                                       # 81..100
    assert len(values) == 101
    calls = iter(values)

    def track(logits, y):
        return torch.tensor([next(calls)])

    _, trace = apgd(model, x, y, 0.03, 100, track_fn=track, return_trace=True)
    assert next(calls, None) is None  # one tracked value per forward
    assert trace["checkpoints"] == [22, 41, 57, 70, 80, 87, 93, 99]
    eta = trace["eta"][:, 0].tolist()  # eta[k]: the step of update k + 1
    want = [0.06] * 41 + [0.03] * 16 + [0.015] * 23 + [0.0075] * 7 + [0.00375] * 6 + [0.001875] * 6 + [0.0009375]
    assert eta == pytest.approx(want)


def test_apgd_restart_keeps_the_momentum_term(model):
    """After a halving the image restarts at its best point and the next update is
    x_best + a (z - x_best) + (1 - a)(x_best - x_{k-1}), x_{k-1} the iterate before the
    last one (apgd_train leaves x_adv_old alone): a tracked loss that never rises after
    update 1 halves at every check of n = 4 (windows of 1), the best stays the start x0."""
    x, y = batch(model, n=1)
    calls = iter([5.0, 1.0, 0.5, 0.25, 0.125])  # f_0 = 5 stays the best; update 1: 1 > 0 is a rise

    def track(logits, y):
        return torch.tensor([next(calls)])

    seen = []
    _, trace = apgd(model, x, y, 0.03, 4, track_fn=track, return_trace=True,
                    on_step=lambda t, logits: seen.append(logits))
    # check 1 (after update 1): 1 rise (1 > 0), 1 <= 0.75 no; condition 2 skipped: keep 0.06.
    # check 2: 0.5 > 1 no, 0 rises: halve -> 0.03, restart at x0; check 3: halve -> 0.015
    assert trace["eta"][:, 0].tolist() == pytest.approx([0.06, 0.06, 0.03, 0.015])

    def grad_at(z):  # the attack's gradient: of the default loss, the mean pixel CE
        zr = z.clone().requires_grad_(True)
        return torch.autograd.grad(image_ce(model(zr), y).sum(), zr)[0]

    def proj(z):
        return torch.clamp(torch.min(torch.max(z, x - 0.03), x + 0.03), 0, 1)

    x1 = proj(x + 1.0 * (proj(x + 0.06 * grad_at(x).sign()) - x) + 0.0 * (x - x))      # a = 1
    z3 = proj(x + 0.03 * grad_at(x).sign())       # after check 2: at x0 (the best), x0's gradient
    x3 = proj(x + 0.75 * (z3 - x) + 0.25 * (x - x1))  # x_{k-1} = x1 kept: momentum x0 - x1
    with torch.no_grad():
        torch.testing.assert_close(seen[3], model(x3), rtol=0, atol=0)
        assert not torch.equal(seen[3], model(proj(x + 0.75 * (z3 - x))))  # the momentum term matters


def test_worst_case_is_per_image_no_better_than_any_attack(model):
    x, y = batch(model, n=4)
    eps = 0.03
    cands = [segpgd(model, x, y, eps, 0.01, 5, generator=torch.Generator().manual_seed(0)),
             cospgd(model, x, y, eps, 0.01, 5, generator=torch.Generator().manual_seed(1)),
             apgd(model, x, y, eps, 5),
             pgd(model, x, y, mode="standard", eps=eps, alpha=0.01, steps=5, targeted=False)]
    accs = torch.stack([accuracy(model, c, y) for c in cands])  # (K, N)
    adv, acc, which = worst_case(model, x, y, cands)
    assert (acc <= accs).all()
    torch.testing.assert_close(acc, accs.min(0).values)
    torch.testing.assert_close(accuracy(model, adv, y), acc)
    for i in range(x.shape[0]):
        assert torch.equal(adv[i], cands[int(which[i])][i])
        assert accs[int(which[i]), i] == accs[:, i].min()
    # per image, not one batch for all: halves of the strongest batch mixed with clean images
    strong = cands[int(which[0])]
    assert (accuracy(model, strong, y) < accuracy(model, x, y)).all()
    first = torch.cat([strong[:2], x[2:]])
    second = torch.cat([x[:2], strong[2:]])
    mixed, _, picked = worst_case(model, x, y, [first, second])
    assert picked.tolist() == [0, 0, 1, 1]
    assert torch.equal(mixed, strong)


def test_sea_is_per_image_no_better_than_each_of_its_losses(model):
    x, y = batch(model, n=4)
    eps, steps = 0.03, 10
    adv, acc, which = sea(model, x, y, eps, steps, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the three runs draw their starts one after the other
    singles = [apgd(model, x, y, eps, steps, loss_fn=fn, track_fn=image_ce, schedule=SEA_SCHEDULE,
                    random_start=True, generator=g)
               for fn in (balanced_masked_ce, masked_ce, js_divergence)]
    accs = torch.stack([accuracy(model, s, y) for s in singles])
    assert (acc <= accs).all()
    torch.testing.assert_close(acc, accs.min(0).values)
    torch.testing.assert_close(accuracy(model, adv, y), acc)
    assert (adv - x).abs().amax() <= eps + 1e-6


# --------------------------------------------------------------------------- curves from one run
class Counter:
    """Counts the model's forwards (a forward hook) and records on_step's calls."""

    def __init__(self, model):
        self.forwards, self.calls = 0, []
        self.handle = model.register_forward_hook(self.hook)

    def hook(self, module, args, out):
        self.forwards += 1

    def on_step(self, t, logits):
        self.calls.append((t, logits.clone()))


CURVED = {
    "pgd-standard": lambda m, x, y, s, cb: pgd(m, x, y, mode="standard", eps=0.03, alpha=0.01, steps=s,
                                               targeted=False, random_start=True,
                                               generator=torch.Generator().manual_seed(0), on_step=cb),
    "pgd-faithful": lambda m, x, y, s, cb: pgd(m, x, torch.zeros_like(y), mode="faithful", eps=0.01, steps=s,
                                               on_step=cb),
    "segpgd": lambda m, x, y, s, cb: segpgd(m, x, y, 0.03, 0.01, s, generator=torch.Generator().manual_seed(0),
                                            on_step=cb),
    "cospgd": lambda m, x, y, s, cb: cospgd(m, x, y, 0.03, 0.01, s, generator=torch.Generator().manual_seed(0),
                                            on_step=cb),
    "apgd": lambda m, x, y, s, cb: apgd(m, x, y, 0.03, s, on_step=cb),
    "padam": lambda m, x, y, s, cb: padam(m, x, y, 0.03, s, generator=torch.Generator().manual_seed(0), on_step=cb),
}


@pytest.mark.parametrize("name", list(CURVED))
def test_on_step_sees_every_step_without_an_extra_forward(model, name):
    x, y = batch(model)
    steps = 7
    quiet = Counter(model)
    plain = CURVED[name](model, x, y, steps, None)
    quiet.handle.remove()
    seen = Counter(model)
    adv = CURVED[name](model, x, y, steps, seen.on_step)
    seen.handle.remove()
    assert torch.equal(adv, plain)  # recording changes nothing
    assert [t for t, _ in seen.calls] == list(range(steps + 1))
    assert all(lg.shape == (x.shape[0], CLASSES, SIZE, SIZE) for _, lg in seen.calls)
    assert seen.forwards == steps + 1  # the attack's own forwards, nothing added for the curve
    if name.startswith("pgd"):
        assert quiet.forwards == steps  # without on_step, no final forward at all
    if name != "apgd":  # the last logits are the prediction on the returned image
        with torch.no_grad():
            assert torch.equal(seen.calls[-1][1], model(adv))


def test_on_step_logits_are_the_prediction_after_t_steps(model):
    """Standard PGD's loss does not depend on the number of steps, so the t-th logits
    of a long run are the final prediction of a t-step run."""
    x, y = batch(model)
    long = Counter(model)
    CURVED["pgd-standard"](model, x, y, 5, long.on_step)
    long.handle.remove()
    for t in (0, 2, 4):
        adv = CURVED["pgd-standard"](model, x, y, t, None)
        with torch.no_grad():
            assert torch.equal(long.calls[t][1], model(adv))


def test_apgd_on_step_counts_each_stage_start(model):
    x, y = batch(model)
    seen = Counter(model)
    apgd(model, x, y, 0.03, 10, schedule=SEA_SCHEDULE, on_step=seen.on_step)
    seen.handle.remove()
    assert [t for t, _ in seen.calls] == list(range(10 + 3))
    assert seen.forwards == 10 + 3  # each of the three stages evaluates its start once


# --------------------------------------------------------------------------- SEA's early stop
def boundary_model(margin: float = 0.01) -> torch.nn.Conv2d:
    """2 classes from a 1x1 convolution: logit 0 = 0, logit 1 = (r + g + b) - 1.5 - margin.
    A grey pixel (0.5) is class 0 by ``margin``; raising each channel by d adds 3d to logit 1,
    so the CE of class 0 grows along +1 on every channel (its gradient's sign)."""
    net = torch.nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.0] * 3, [1.0] * 3]).view(2, 3, 1, 1))
        net.bias.copy_(torch.tensor([0.0, -1.5 - margin]))
    return net.eval()


def grey(*levels: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One 4x4 image per level, every channel at that level, all pixels of true class 0."""
    x = torch.stack([torch.full((3, 4, 4), v) for v in levels])
    return x, torch.zeros(len(levels), 4, 4, dtype=torch.int64)


@pytest.mark.parametrize("early_stop", [True, False])
def test_apgd_early_stop_ends_the_run_once_the_whole_batch_is_fooled(early_stop):
    """apgd_train's stop, by hand: two grey images, eps 0.03, 10 updates. Update 1 (a = 1):
    z = P(x + 0.06 sign(grad)) = x + 0.03 on every channel, x_1 = P(x + (z - x)) = x + 0.03:
    logit 1 = 0.09 - 0.01 > 0 at every pixel, so both images are at accuracy 0 (acc.sum()
    == 0) and the run stops after that update: the start and update 1, 2 forwards (t 0, 1),
    x_1 returned. Without the stop all 11 forwards run; every later iterate stays at the
    ball's edge x + 0.03 (the gradient's sign is still +1), so the result is the same."""
    net = boundary_model()
    x, y = grey(0.5, 0.5)
    seen = Counter(net)
    adv, trace = apgd(net, x, y, 0.03, 10, on_step=seen.on_step, early_stop=early_stop, return_trace=True)
    seen.handle.remove()
    runs = 2 if early_stop else 11
    assert [t for t, _ in seen.calls] == list(range(runs)) and seen.forwards == runs
    assert torch.equal(adv, x + 0.03)
    assert accuracy(net, adv, y).tolist() == [0.0, 0.0]
    assert trace["eta"].shape == (runs - 1, 2) and len(trace["radius"]) == runs - 1  # the updates run
    assert trace["checkpoints"] == [c for c in apgd_checkpoints(10) if c < runs]     # 2, 4, ... once they ran


def test_apgd_early_stop_needs_every_image_of_the_batch():
    """The same grey image beside a dark one (0.1: logit 1 <= 0.3 + 3 * 0.03 - 1.51 < 0 in
    the ball, never fooled): the batch never reaches acc.sum() == 0, every forward runs, and
    the result is the one without the stop, bit for bit."""
    net = boundary_model()
    x, y = grey(0.5, 0.1)
    seen = Counter(net)
    adv = apgd(net, x, y, 0.03, 10, on_step=seen.on_step, early_stop=True)
    seen.handle.remove()
    assert [t for t, _ in seen.calls] == list(range(11)) and seen.forwards == 11
    assert torch.equal(adv, apgd(net, x, y, 0.03, 10))
    assert accuracy(net, adv, y).tolist() == [0.0, 1.0]


def test_sea_early_stop_ends_each_stage_and_keeps_the_full_runs_t():
    """SEA, 10 steps: stages of 3, 3 and 4 updates at 0.06, 0.045, 0.03 (apgd_largereps);
    a full run's forwards have t = 0..12, the stage starts at t = 0, 4, 8. Grey images,
    random start: at each stage's update 1 (a = 1) a pixel still right moves by +r on every
    channel (logit 1 >= 3 * 0.03 - 0.01 > 0); a fooled one stays fooled (the masked losses
    give it no gradient, z = x_k; JS moves it to +r too). So every stage stops after its
    first update -- the next stage still runs, from the fooled image projected -- and each
    loss reports its start and update 1 of each stage, at the t they have in the full run:
    0, 1, 4, 5, 8, 9. One forward more per loss for worst_case."""
    net = boundary_model()
    x, y = grey(0.5, 0.5)
    full, stopped = {}, {}
    for early_stop, calls in ((False, full), (True, stopped)):
        counter = Counter(net)
        adv, acc, _ = sea(net, x, y, 0.03, 10, generator=torch.Generator().manual_seed(0), early_stop=early_stop,
                          on_step=lambda name, t, logits, calls=calls: calls.setdefault(name, []).append(t))
        counter.handle.remove()
        assert counter.forwards == sum(len(ts) for ts in calls.values()) + 3
        assert acc.tolist() == [0.0, 0.0] and (adv - x).abs().amax() <= 0.03 + 1e-6
    starts = [0, 3 + 1, 3 + 1 + 3 + 1]
    for name in SEA_LOSSES:
        assert full[name] == list(range(10 + 3))
        assert stopped[name] == [t for s in starts for t in (s, s + 1)] == [0, 1, 4, 5, 8, 9]
    # the stop comes after the step-size check: update 1 of each stage is a checkpoint
    # (windows of max(int(0.22 n), 1) = 1 for n = 3 and 4), and it is recorded
    _, trace = apgd(net, x, y, 0.03, 10, loss_fn=masked_ce, track_fn=image_ce, schedule=SEA_SCHEDULE,
                    random_start=True, generator=torch.Generator().manual_seed(0), early_stop=True,
                    return_trace=True)
    assert trace["checkpoints"] == [1, 4, 7]
    assert trace["radius"].tolist() == pytest.approx([0.06, 0.045, 0.03]) and trace["eta"].shape == (3, 2)


def test_sea_early_stop_changes_nothing_where_it_never_fires(model):
    """The U-Net's batch is never at accuracy 0 as a whole: SEA with the stop is SEA
    without it, bit for bit, and every forward runs."""
    x, y = batch(model)
    seen = []
    got = sea(model, x, y, 0.03, 10, generator=torch.Generator().manual_seed(2),
              on_step=lambda name, t, logits: seen.append(t))
    want = sea(model, x, y, 0.03, 10, generator=torch.Generator().manual_seed(2), early_stop=False)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert seen == list(range(13)) * 3
    assert (got[1] > 0).all()


# --------------------------------------------------------------------------- arguments
def test_bad_arguments_are_named(model):
    x, y = batch(model)
    with pytest.raises(ValueError, match="-0.1"):
        segpgd(model, x, y, -0.1, 0.01, 3)
    with pytest.raises(ValueError, match="alpha=0"):
        cospgd(model, x, y, 0.03, 0.0, 3)
    with pytest.raises(ValueError, match="must end at radius"):
        apgd(model, x, y, 0.03, 3, schedule=((0.5, 2.0), (0.5, 1.5)))
    with pytest.raises(ValueError, match=r"\(2, 16, 16\)"):
        apgd(model, x, y[:2], 0.03, 3)
    with pytest.raises(ValueError, match="bogus"):
        untargeted(model, x, y, "bogus", 0.03, 3)


@pytest.mark.parametrize("name", ["pgd", "segpgd", "cospgd", "apgd", "sea", "padam-ce", "padam-cos"])
def test_untargeted_dispatches_to_the_named_attack(model, name):
    x, y = batch(model, n=2)
    got = untargeted(model, x, y, name, 0.03, 4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    want = {"pgd": lambda: pgd(model, x, y, mode="standard", eps=0.03, alpha=0.0075, steps=4, targeted=False,
                               random_start=True, generator=g),
            "segpgd": lambda: segpgd(model, x, y, 0.03, 0.0075, 4, generator=g),
            "cospgd": lambda: cospgd(model, x, y, 0.03, 0.0075, 4, generator=g),
            "apgd": lambda: apgd(model, x, y, 0.03, 4),
            "sea": lambda: sea(model, x, y, 0.03, 4, generator=g)[0],
            "padam-ce": lambda: padam(model, x, y, 0.03, 4, generator=g),
            "padam-cos": lambda: padam(model, x, y, 0.03, 4, loss_fn=cosine_distance, generator=g)}[name]()
    assert torch.equal(got, want)


# --------------------------------------------------------------------------- PAdam
class Linear1x1(torch.nn.Module):
    """logits = W x per pixel (a 1x1 convolution, no bias): the gradient is written out."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, x):
        return torch.einsum("cd,ndhw->nchw", self.w, x)


def test_padam_steps_are_hand_computed_adam_on_a_linear_model():
    """One pixel, W = [[1, 0, 0], [0, 1, 0]], x = (0.5, 0.5, 0.5), y = 0, no random start.
    CE gradient in x: W^T (softmax(Wx) - onehot(y)).
    Step 1: z = (0.5, 0.5), p = (0.5, 0.5): g1 = (-0.5, 0.5, 0). m = 0.1 g1, v = 0.001 g1^2,
      bias corrections 0.1 and 0.001: delta1 = lr g1 / (|g1| + 1e-8) = lr (-1, 1, 0)(1 - 2e-8).
    Step 2: x1 = x + delta1, z = (0.5 + d1_0, 0.5 + d1_1), q = 1 - p_0 = sigmoid(z_1 - z_0):
      g2 = (-q, q, 0); m = 0.9 m1 + 0.1 g2; v = 0.999 v1 + 0.001 g2^2; v_max = max(v1, v);
      delta2 = delta1 + lr / 0.19 * m / (sqrt(v_max) / sqrt(0.001999) + 1e-8), 1 - 0.9^2 = 0.19,
      1 - 0.999^2 = 0.001999. eps = 8/255 > 2 lr: no clipping."""
    net = Linear1x1([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).double()
    x = torch.full((1, 3, 1, 1), 0.5, dtype=torch.float64)
    y = torch.zeros(1, 1, 1, dtype=torch.int64)
    lr, eps = 2 / 255, 8 / 255
    one = padam(net, x, y, eps, 1, random_start=False) - x
    d1 = [lr * -0.5 / (0.5 + 1e-8), lr * 0.5 / (0.5 + 1e-8), 0.0]
    assert one.flatten().tolist() == pytest.approx(d1, rel=1e-12, abs=1e-15)
    two = padam(net, x, y, eps, 2, random_start=False) - x
    q = 1 / (1 + math.exp(-((0.5 + d1[1]) - (0.5 + d1[0]))))
    want = []
    for i, (g1, g2) in enumerate([(-0.5, -q), (0.5, q), (0.0, 0.0)]):
        m = 0.9 * (0.1 * g1) + 0.1 * g2
        v1 = 0.001 * g1 ** 2
        vmax = max(v1, 0.999 * v1 + 0.001 * g2 ** 2)
        want.append(d1[i] + lr / 0.19 * m / (math.sqrt(vmax) / math.sqrt(0.001999) + 1e-8))
    assert two.flatten().tolist() == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert want[1] > d1[1] > 0  # it keeps climbing the CE: away from class 0


def test_padam_is_torch_adam_amsgrad_maximize_projected(model):
    """The loop of RSE's padam with torch.optim.Adam(lr=2/255, amsgrad=True, maximize=True),
    one image (so its batch mean is the image's mean), from the same uniform start."""
    x, y = batch(model, n=1)
    eps, steps = 0.03, 5
    delta = ((x + eps * noise(x.shape, 9)).clamp(0, 1) - x).clone()
    opt = torch.optim.Adam([delta], lr=2 / 255, amsgrad=True, maximize=True)
    for _ in range(steps):
        d = delta.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(x + d), y, reduction="none").mean()
        delta.grad = torch.autograd.grad(loss, d)[0]
        opt.step()
        with torch.no_grad():
            delta.clamp_(-eps, eps)
            delta.copy_((x + delta).clamp(0, 1) - x)
    got = padam(model, x, y, eps, steps, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(got, x + delta.detach(), rtol=0, atol=1e-6)


def test_padam_stays_in_the_ball_every_step(model):
    x, y = batch(model)  # in [0.1, 0.9]: the box never cuts the ball (edge_batch: the tests above)
    eps = 0.01  # below Adam's first step (2/255): every step hits the ball
    seen = []
    adv = padam(model, x, y, eps, 5, loss_fn=cosine_distance, generator=torch.Generator().manual_seed(1),
                on_step=lambda t, logits: seen.append(t))
    assert (adv - x).abs().amax() <= eps + 1e-7 and adv.min() >= 0 and adv.max() <= 1
    assert ((adv - x).abs() > eps - 1e-6).float().mean() > 0.5  # most coordinates sit on the ball's face
    assert seen == list(range(6))


def test_cosine_distance_is_of_the_raw_logits():
    logits = torch.tensor([1.0, 2.0, 2.0]).view(1, 3, 1, 1)  # cos to onehot(0) = 1 / 3
    y = torch.zeros(1, 1, 1, dtype=torch.int64)
    assert cosine_distance(logits, y).item() == pytest.approx(2 / 3, rel=1e-6)


# --------------------------------------------------------------------------- class weights, greedy mIoU
def test_inverse_frequency_sums_to_one_over_counted_classes():
    # counts 2, 1, 1, 0 -> 1/2, 1, 1, 0 -> / 2.5
    assert inverse_frequency(torch.tensor([2, 1, 1, 0])).tolist() == pytest.approx([0.2, 0.4, 0.4, 0.0])
    with pytest.raises(ValueError, match="no"):
        inverse_frequency(torch.zeros(3, dtype=torch.int64))


def test_greedy_worst_miou_worked_by_hand():
    """Two classes, two images, two candidates (inter, union per class):
      A: cand 0 (8, 2) / (10, 4), cand 1 (6, 0) / (10, 6);  B: cand 0 (5, 5) / (6, 6), cand 1 (6, 5) / (6, 6).
    Start all at 0: (13, 7) / (16, 10), mIoU (13/16 + 7/10) / 2 = 0.75625. Whatever the order:
    A with 1: (11/16 + 5/12) / 2 = 0.5520833 < 0.75625, taken; B with 1: (12/16 + 5/12) / 2
    = 0.5833 > 0.5520833, not. Round 2 changes nothing (a drop <= 1e-6): stop after 2 rounds."""
    inter = np.array([[[8, 2], [5, 5]], [[6, 0], [6, 5]]], float)
    union = np.array([[[10, 4], [6, 6]], [[10, 6], [6, 6]]], float)
    miou, chosen, rounds = greedy_worst_miou(inter, union)
    assert miou == pytest.approx((11 / 16 + 5 / 12) / 2, rel=1e-12)
    assert chosen == [1, 0] and rounds == 2


def test_greedy_worst_miou_keeps_the_authors_comparison():
    """worse_only.py compares each candidate with the mIoU as it stood when the image's turn
    began, so a later candidate below it replaces a lower earlier one. One image, one class:
    IoU 0.9, 0.1, 0.5 for candidates 0, 1, 2: 1 is taken (0.1 < 0.9), then 2 (0.5 < 0.9)."""
    inter = np.array([[[9.0]], [[1.0]], [[5.0]]])
    union = np.full((3, 1, 1), 10.0)
    miou, chosen, _ = greedy_worst_miou(inter, union)
    assert chosen == [2] and miou == pytest.approx(0.5)


def test_labels_name_the_strength_and_say_when_it_is_reduced():
    from mlsys.robust import ATTACKS, label

    assert label("sea", 300) == "SEA (300 steps)"
    assert label("sea", 4) == "SEA-style, 4 steps (reduced from 300)"
    assert label("padam-cos", 10) == "PAdam-Cos-style, 10 steps (reduced from 200)"
    assert label("segpgd", 4) == "SegPGD, 4 steps"
    assert label("new-attack", 7) == "new-attack, 7 steps"  # an attack without a title keeps its key
    assert all(label(a, 1) for a in ATTACKS)
