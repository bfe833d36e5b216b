"""Tests of the field's untargeted attacks (mlsys.attacks: segpgd, cospgd, apgd with
SEA's losses and radius schedule, worst_case, sea) and of the on_step curves.

Each attack is compared with a plain loop written here from the paper's equations
(none of mlsys.attacks' helpers is used by the references); the losses' weights are
checked on hand-made logits; and every attack stays in the eps-ball and [0, 1],
restores the model's mode, and reports its own forwards through on_step."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mlsys.attacks import pgd
from mlsys.robust import SEA_SCHEDULE, apgd, apgd_checkpoints, balanced_masked_ce, cospgd, cospgd_loss, image_ce, js_divergence, masked_ce, sea, segpgd, segpgd_loss, untargeted, worst_case
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


def paper_checkpoints(n_iter):
    """w_j = ceil(p_j N) for p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    ps = [0.0, 0.22]
    while ps[-1] < 1 - 1e-9:
        ps.append(ps[-1] + max(ps[-1] - ps[-2] - 0.03, 0.06))
    return {math.ceil(round(p * n_iter, 6)) for p in ps[1:-1]} - {0}


def reference_apgd_one(model, x, y, eps, stages, attack_loss, tracked_loss, start):
    """APGD for ONE image x (1, 3, H, W), stage by stage (radius, iterations), from
    Croce & Hein 2020: momentum 0.75, eta_0 = 2r, halving when fewer than 0.75 of the
    updates since the last checkpoint raised the loss, or when the last checkpoint did
    not halve and the best loss did not grow; then restart at the best point. Keeps
    the lowest-accuracy iterate; the next stage starts from it, projected."""
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
            return torch.clamp(z, x - r, x + r).clamp(0, 1)

        cur = proj(point)
        g, f, acc = evaluate(cur, n_iter > 0)
        low, low_acc = cur, acc
        best, f_best, g_best = cur, f, g
        eta, prev, f_prev = 2 * r, cur, f
        last_w, halved_last, f_best_last, n_up = 0, False, f, 0
        checks = paper_checkpoints(n_iter)
        for k in range(n_iter):
            z = proj(cur + eta * g.sign())
            new = z if k == 0 else proj(cur + 0.75 * (z - cur) + 0.25 * (cur - prev))
            prev, cur = cur, new
            etas.append(eta)
            g, f, acc = evaluate(cur, k < n_iter - 1)
            n_up += f > f_prev
            f_prev = f
            if acc <= low_acc:
                low, low_acc = cur, acc
            if f > f_best:
                best, f_best, g_best = cur, f, g
            if k + 1 in checks:
                cond1 = n_up < 0.75 * (k + 1 - last_w)
                cond2 = not halved_last and f_best == f_best_last
                halved_last = cond1 or cond2
                last_w, f_best_last, n_up = k + 1, f_best, 0
                if halved_last:
                    eta = eta / 2
                    cur = prev = best
                    g, f_prev = g_best, f_best
        point = low
    return point, etas


def reference_apgd(model, x, y, eps, steps, schedule, attack_loss, tracked_loss, start):
    """reference_apgd_one image by image; stage lengths int(share * steps), the rest last."""
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


def test_apgd_equals_the_paper_loop(model):
    x, y = batch(model)
    eps, steps = 0.03, 20
    got, trace = apgd(model, x, y, eps, steps, return_trace=True)
    want, etas = reference_apgd(model, x, y, eps, steps, ((1.0, 1.0),), ref_ce, ref_ce, x)
    assert torch.equal(got, want)
    torch.testing.assert_close(trace["eta"], etas.float(), rtol=0, atol=0)


def test_apgd_with_sea_schedule_and_masked_ce_equals_the_paper_loop(model):
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


def test_checkpoints_follow_the_paper():
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    for n in (1, 3, 7, 10, 20, 33, 90, 120, 300):
        assert set(apgd_checkpoints(n)) == paper_checkpoints(n)


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
    """Checkpoints of 100 steps: 22, 41, 57, 70. The tracked loss (injected) is
    scripted so that each rule of Croce & Hein decides one checkpoint:
      22: 17 of 22 updates raised it (17 >= 0.75 * 22) and the best grew: keep eta;
      41: 15 of 19 raised it (>= 14.25) but the best (17) did not grow: condition 2 halves;
      57: 12 of 16 raised it, exactly 0.75 * 16 (not FEWER), halved last time: keep;
      70: 9 of 13 raised it (< 9.75) though the best grew: condition 1 halves."""
    x, y = batch(model, n=1)
    values = [0.0]                                                    # f_0, the start
    values += [float(v) for v in range(1, 18)] + [16, 15, 14, 13, -10]   # updates 1..22
    values += [float(v) for v in range(-9, 6)] + [4, 3, 2, 1]            # 23..41
    values += [0] + [float(v) for v in range(1, 13)] + [0, -1, -2]      # 42..57 (after the restart f = 17)
    values += [float(v) for v in range(20, 29)] + [27, 26, 25, 24]       # 58..70
    values += [-100.0] * 30                                           # 71..100
    calls = iter(values)

    def track(logits, y):
        return torch.tensor([next(calls)])

    _, trace = apgd(model, x, y, 0.03, 100, track_fn=track, return_trace=True)
    assert next(calls, None) is None  # one tracked value per forward
    eta = trace["eta"][:, 0].tolist()  # eta[k]: the step of update k + 1
    assert eta[:41] == pytest.approx([0.06] * 41)
    assert eta[41:70] == pytest.approx([0.03] * 29)
    assert eta[70] == pytest.approx(0.015)


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


@pytest.mark.parametrize("name", ["pgd", "segpgd", "cospgd", "apgd", "sea"])
def test_untargeted_dispatches_to_the_named_attack(model, name):
    x, y = batch(model, n=2)
    got = untargeted(model, x, y, name, 0.03, 4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    want = {"pgd": lambda: pgd(model, x, y, mode="standard", eps=0.03, alpha=0.0075, steps=4, targeted=False,
                               random_start=True, generator=g),
            "segpgd": lambda: segpgd(model, x, y, 0.03, 0.0075, 4, generator=g),
            "cospgd": lambda: cospgd(model, x, y, 0.03, 0.0075, 4, generator=g),
            "apgd": lambda: apgd(model, x, y, 0.03, 4),
            "sea": lambda: sea(model, x, y, 0.03, 4, generator=g)[0]}[name]()
    assert torch.equal(got, want)
