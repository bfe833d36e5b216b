"""Untargeted L-inf attacks as the segmentation-robustness literature runs them today,
the robustness protocol's attacks (``evaluate.robust``; docs/robustness.md):
- ``segpgd``: PGD on a loss that shifts weight from correctly to wrongly
  classified pixels over the iterations (Gu et al., ECCV 2022).
- ``cospgd``: PGD on the pixel loss weighted by the cosine similarity of
  softmax(logits) and onehot(y) (Agnihotri & Keuper, ICML 2024).
- ``apgd``: APGD (Croce & Hein, ICML 2020) with an optional progressive radius
  schedule; with the SEA losses (``masked_ce``, ``balanced_masked_ce``,
  ``js_divergence``) and ``sea`` it is SEA-style (Croce, Singh & Hein, 2023).
- ``worst_case``: per image the candidate with the lowest pixel accuracy.
Each runs the loop of :mod:`mlsys.attacks` (``signed_steps``) or APGD's own; on_step
as there. Only the evaluate stage imports this module: a new attack re-runs nothing else.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .attacks import Loss, OnStep, logits_and_grad, pgd, signed_steps, uniform_start
from .metrics import pixel_accuracy, predicted_class, worst_candidate
from .model import eval_mode
from .params import ParamsError, RobustParams


# --------------------------------------------------------------------------- losses
# Losses of an untargeted attack on the true mask y (N, H, W) int64; logits (N, C, H, W).
# Each returns one loss per image (N,): image i's gradient is that of its own loss, so the
# result for an image does not depend on the batch it is in.
StepLoss = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]  # (logits, y, t, steps) -> (N,)


def pixel_ce_map(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every pixel: logits (N, C, H, W), y (N, H, W) -> (N, H, W) float32,
    whatever the logits' dtype."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def _image_mean(per_pixel: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> (N,): the mean over each image's pixels."""
    return per_pixel.flatten(1).mean(1)


def segpgd_loss(logits: torch.Tensor, y: torch.Tensor, t: int, steps: int) -> torch.Tensor:
    """SegPGD's loss (Gu et al. 2022, Sec. 3: the loss is their Eq. 4 and lambda(t)
    their Eq. 5 as we read arXiv 2207.12391v3; used in Algorithm 1, t = 1..T):
        L = 1/(HW) [ (1 - lam) sum_{correct j} CE_j + lam sum_{wrong k} CE_k ],
        lam = (t' - 1) / (2T), t' = 1..T the paper's 1-based iteration.
    Here t = 0..steps-1 is the 0-based update index, so lam = t / (2 * steps): the
    first update attacks only the correctly classified pixels (the authors' code in
    shashankskagnihotri/cospgd does the same, iteration/(2*iterations) from 0).
    Correct/wrong is the argmax of the same logits; the weights carry no gradient."""
    lam = t / (2 * steps)
    correct = predicted_class(logits) == y
    weight = torch.where(correct, 1.0 - lam, lam)
    return _image_mean(weight * pixel_ce_map(logits, y))


def cospgd_loss(logits: torch.Tensor, y: torch.Tensor, t: int = 0, steps: int = 1) -> torch.Tensor:
    """CosPGD's loss (Agnihotri & Keuper 2024, Algorithm 1): each pixel's CE times
    cos(softmax(logits), onehot(y)) = p_y / ||p||_2, detached (a weight, not a
    term), mean over pixels. Softmax over the classes, as the authors' code
    (cospgd_scale) does for segmentation; pixels already fooled weigh less."""
    p = logits.float().softmax(1)
    onehot = F.one_hot(y, logits.shape[1]).permute(0, 3, 1, 2).float()
    cos = F.cosine_similarity(p, onehot, dim=1)
    return _image_mean(cos.detach() * pixel_ce_map(logits, y))


def image_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean pixel cross-entropy of each image: logits (N, C, H, W), y (N, H, W) -> (N,)
    float32. APGD's loss, and SEA's tracked loss."""
    return _image_mean(pixel_ce_map(logits, y))


def masked_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SEA's Mask-CE: the CE of the pixels still classified correctly (mask detached),
    zero elsewhere, mean over ALL pixels (N,): fooled pixels stop pulling."""
    correct = (predicted_class(logits) == y).float()
    return _image_mean(correct * pixel_ce_map(logits, y))


def class_weights(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse class frequency of masks y (N, H, W), normalised to sum 1 over the
    classes present (absent classes 0): (n_classes,). SEA precomputes these on the
    dataset (its VOC weights give background 0.0007)."""
    count = torch.bincount(y.flatten(), minlength=n_classes).double()
    w = torch.where(count > 0, 1.0 / count.clamp(min=1), torch.zeros_like(count))
    return (w / w.sum()).float()


def balanced_masked_ce(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """SEA's Mask-CE-Bal: masked CE with pixel j weighted by weights[y_j] (N,).
    weights: (C,) shared by all images (SEA: dataset frequencies, ``class_weights``
    of the training masks), or None: each image's own ``class_weights`` (so that an
    image's attack does not depend on the rest of its batch)."""
    n, c = logits.shape[:2]
    if weights is None:
        w = torch.stack([class_weights(y[i], c) for i in range(n)]).to(logits.device)  # (N, C)
    else:
        if weights.shape != (c,):
            raise ValueError(f"class weights of shape {tuple(weights.shape)} are not ({c},)")
        w = weights.to(logits.device).float().expand(n, c)
    pixel_w = torch.gather(w, 1, y.flatten(1)).view_as(y)
    correct = (predicted_class(logits) == y).float()
    return _image_mean(correct * pixel_w * pixel_ce_map(logits, y))


def js_divergence(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SEA's JS loss: Jensen-Shannon divergence of p = softmax(logits) and q = onehot(y)
    per pixel, mean over pixels (N,). With m = (p + q)/2 it is in closed form
        JS = 1/2 [ (1 - p_y) log 2 + p_y log(2 p_y / (1 + p_y)) ] + 1/2 log(2 / (1 + p_y)),
    bounded by log 2, so pixels already fooled saturate. Not masked: the authors'
    js_loss (nmndeep/Robust-Segmentation, semseg/attacker.py) masks only ignored labels."""
    p_y = torch.gather(logits.float().softmax(1), 1, y.unsqueeze(1)).squeeze(1)
    log2 = torch.log(torch.tensor(2.0, device=logits.device))
    kl_p = (1 - p_y) * log2 + torch.xlogy(p_y, 2 * p_y / (1 + p_y))
    kl_q = torch.log(2 / (1 + p_y))
    return _image_mean((kl_p + kl_q) / 2)


def _check_attack(x: torch.Tensor, y: torch.Tensor, eps: float, steps: int) -> None:
    if x.dim() != 4 or y.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"images {tuple(x.shape)} and masks {tuple(y.shape)} are not (N, 3, H, W) and (N, H, W)")
    if not eps > 0:
        raise ValueError(f"attack radius eps={eps} is not positive")
    if steps < 0:
        raise ValueError(f"attack steps={steps} is negative")


def _signed_pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
                loss_fn: StepLoss, random_start: bool, generator: torch.Generator | None,
                on_step: OnStep | None, amp: bool) -> torch.Tensor:
    """Untargeted PGD on a step-dependent per-image loss: x <- clip(P_eps(x + alpha *
    sign(grad_x loss_fn(model(x), y, t, steps))), 0, 1), t = 0..steps-1."""
    _check_attack(x, y, eps, steps)
    if not alpha > 0:
        raise ValueError(f"attack step alpha={alpha} is not positive")
    x0 = x.detach()
    adv = uniform_start(x0, eps, generator) if random_start else x0.clone()
    return signed_steps(model, x0, adv, lambda t: lambda z: loss_fn(z, y, t, steps), alpha, steps, eps,
                        on_step, amp)


def segpgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int, *,
           loss_fn: StepLoss = segpgd_loss, random_start: bool = True, generator: torch.Generator | None = None,
           on_step: OnStep | None = None, amp: bool = False) -> torch.Tensor:
    """SegPGD (Gu et al., ECCV 2022): untargeted L-inf PGD on ``segpgd_loss``.

    x: (N, 3, H, W) float in [0, 1]; y: (N, H, W) int64 true classes; eps: L-inf
    radius; alpha: step; steps: T. Starts from x + U(-eps, eps) (Algorithm 1) unless
    random_start=False; the noise comes from ``generator``. Returns the adversarial
    batch (N, 3, H, W), ||adv - x||_inf <= eps, in [0, 1]. on_step as in ``pgd``."""
    return _signed_pgd(model, x, y, eps, alpha, steps, loss_fn, random_start, generator, on_step, amp)


def cospgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int, *,
           loss_fn: StepLoss = cospgd_loss, random_start: bool = True, generator: torch.Generator | None = None,
           on_step: OnStep | None = None, amp: bool = False) -> torch.Tensor:
    """CosPGD (Agnihotri & Keuper, ICML 2024): untargeted L-inf PGD on ``cospgd_loss``.
    Arguments, start and result as in ``segpgd`` (Algorithm 1 also starts uniformly)."""
    return _signed_pgd(model, x, y, eps, alpha, steps, loss_fn, random_start, generator, on_step, amp)


# SEA's progressive radius: (share of the iterations, radius / eps), 2 eps -> 1.5 eps -> eps
SEA_SCHEDULE = ((0.3, 2.0), (0.3, 1.5), (0.4, 1.0))


def apgd_checkpoints(n_iter: int) -> list[int]:
    """APGD's checkpoints w_j = ceil(p_j * n_iter) in 1..n_iter (Croce & Hein 2020):
    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), p_j < 1.
    Kept in hundredths so that 0.41 * 100 is 41, not 41.000000000000004."""
    p, out = [0, 22], []
    while p[-1] < 100:
        out.append(-(-p[-1] * n_iter // 100))
        p.append(p[-1] + max(p[-1] - p[-2] - 3, 6))
    return sorted({w for w in out if 1 <= w <= n_iter})


def _stages(steps: int, schedule: Sequence[tuple[float, float]]) -> list[tuple[int, float]]:
    """(iterations, radius / eps) per stage: int(share * steps) each, the rest to the last."""
    if not schedule or schedule[-1][1] != 1.0:
        raise ValueError(f"radius schedule {schedule!r} must end at radius 1.0 * eps")
    if any(share < 0 or mult <= 0 for share, mult in schedule):
        raise ValueError(f"radius schedule {schedule!r} has a negative share or a non-positive radius")
    counts = [int(share * steps) for share, _ in schedule[:-1]]
    if sum(counts) > steps:
        raise ValueError(f"radius schedule {schedule!r} shares add up to more than 1")
    counts.append(steps - sum(counts))
    return [(n, mult) for n, (_, mult) in zip(counts, schedule)]


def apgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, *,
         loss_fn: Loss = image_ce, track_fn: Loss | None = None,
         schedule: Sequence[tuple[float, float]] = ((1.0, 1.0),), momentum: float = 0.75, rho: float = 0.75,
         random_start: bool = False, generator: torch.Generator | None = None, on_step: OnStep | None = None,
         amp: bool = False, return_trace: bool = False):
    """APGD (Croce & Hein, ICML 2020), untargeted L-inf, for segmentation as SEA runs it.

    x: (N, 3, H, W) float in [0, 1]; y: (N, H, W) int64 true classes; eps: final
    L-inf radius; steps: updates in all. loss_fn(logits, y) -> (N,) is maximised
    (default: mean pixel CE; SEA: ``masked_ce``, ``balanced_masked_ce``,
    ``js_divergence``); track_fn (default loss_fn) is the loss whose values drive
    the step size and the restarts (SEA tracks plain CE, ``image_ce``).

    schedule: (share of steps, radius / eps) per stage; ``SEA_SCHEDULE`` runs 30% of
    the steps at 2 eps, 30% at 1.5 eps, 40% at eps. Each stage is one APGD run: it
    starts from the previous stage's result projected onto its ball (the first from
    x, or x + U(-r, r) with random_start), with step eta = 2r, and per image
      z = P(x_k + eta sign(grad)),  x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))
    (a = momentum = 0.75; the first update of a stage is z). At each checkpoint w_j
    (``apgd_checkpoints``) eta halves for an image when
      1. fewer than rho * (w_j - w_{j-1}) of the updates since w_{j-1} raised its loss, or
      2. its eta was not halved at w_{j-1} and its best loss did not grow since,
    and that image restarts from its best-loss point (with that point's gradient and
    no momentum). A stage's result is, per image, its iterate with the LOWEST pixel
    accuracy (later ones win ties), as SEA keeps; the last stage's result is returned:
    (N, 3, H, W), ||adv - x||_inf <= eps, in [0, 1].

    Where this follows the paper rather than the authors' code (fra31/auto-attack,
    nmndeep/Robust-Segmentation): checkpoints are ceil(p_j * n) (the code counts
    int(0.22 n) then shrinks by int(0.03 n)); condition 1 is a strict "fewer than"
    (the code halves at <=); condition 2 also applies at the first checkpoint (the
    code skips it there); after a restart the momentum term is zero (the code keeps
    the jump). SEA's early stop (all pixels fooled) is left out, for full curves.

    Cost: ``steps`` backward passes and steps + len(schedule) forwards (each stage
    evaluates its start). on_step(t, logits) sees every forward in order, t = 0 ..
    steps + len(schedule) - 1 (with one stage, t = number of updates so far); the
    last one is NOT necessarily the returned image (that is the lowest-accuracy one).
    return_trace: also return {"eta": (steps, N) step of each update, "radius":
    (steps,) radius of each update, "checkpoints": update counts (global) checked}."""
    _check_attack(x, y, eps, steps)
    stages = _stages(steps, schedule)
    x0 = x.detach()
    n = x0.shape[0]
    shape = (n,) + (1,) * (x0.dim() - 1)
    track_fn = track_fn or loss_fn
    start = uniform_start(x0, stages[0][1] * eps, generator) if random_start else x0.clone()
    forwards, done = 0, 0
    trace = {"eta": [], "radius": [], "checkpoints": []}

    def look(z: torch.Tensor, grad: bool):
        """Forward (and gradient) at z: logits, grad, tracked loss (N,); on_step called."""
        nonlocal forwards
        logits, g = logits_and_grad(model, z, lambda out: loss_fn(out, y), amp, grad=grad)
        if on_step is not None:
            on_step(forwards, logits)
        forwards += 1
        with torch.no_grad():
            return logits, g, track_fn(logits, y).float()

    with eval_mode(model):
        for n_iter, mult in stages:
            r = mult * eps
            lo, hi = x0 - r, x0 + r

            def project(z: torch.Tensor) -> torch.Tensor:
                return torch.min(torch.max(z, lo), hi).clamp(0, 1)

            cur = project(start)
            logits, grad, f = look(cur, grad=n_iter > 0)
            low, low_acc = cur.clone(), pixel_accuracy(logits, y)           # lowest accuracy so far
            best, f_best = cur.clone(), f.clone()                            # highest tracked loss so far
            g_best = None if grad is None else grad.clone()
            eta = torch.full(shape, 2 * r, device=x0.device)
            prev, f_prev = cur, f
            checks = set(apgd_checkpoints(n_iter))
            w_last, eta_last, f_best_last = 0, eta.clone(), f_best.clone()   # values at w_{j-1}
            raised = torch.zeros(n, device=x0.device)                        # updates that raised the loss
            for k in range(n_iter):
                z = project(cur + eta * grad.sign())
                nxt = z if k == 0 else project(cur + momentum * (z - cur) + (1 - momentum) * (cur - prev))
                prev, cur = cur, nxt.detach()
                trace["eta"].append(eta.flatten().clone())
                trace["radius"].append(r)
                logits, grad, f = look(cur, grad=k < n_iter - 1)  # the last update needs no gradient
                raised += (f > f_prev).float()
                f_prev = f
                acc = pixel_accuracy(logits, y)
                fooled = acc <= low_acc
                low[fooled], low_acc = cur[fooled], torch.minimum(acc, low_acc)
                up = f > f_best
                best[up], f_best[up] = cur[up], f[up]
                if grad is not None:
                    g_best[up] = grad[up]
                if k + 1 in checks:
                    trace["checkpoints"].append(done + k + 1)
                    halve = (raised < rho * (k + 1 - w_last)) | (
                        (eta == eta_last).flatten() & (f_best == f_best_last))
                    w_last, eta_last, f_best_last = k + 1, eta.clone(), f_best.clone()
                    raised.zero_()
                    if halve.any():
                        h = halve.view(shape)
                        eta = torch.where(h, eta / 2, eta)
                        cur = torch.where(h, best, cur)
                        prev = torch.where(h, best, prev)  # no momentum across a restart
                        f_prev = torch.where(halve, f_best, f_prev)
                        if grad is not None:
                            grad = torch.where(h, g_best, grad)
            start = low
            done += n_iter
    adv = start.detach()
    if return_trace:
        eta_steps = torch.stack(trace["eta"]) if trace["eta"] else torch.zeros(0, n)
        return adv, {"eta": eta_steps, "radius": torch.tensor(trace["radius"]), "checkpoints": trace["checkpoints"]}
    return adv


def worst_case(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, candidates: Sequence[torch.Tensor], *,
               amp: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image, the candidate adversarial image with the lowest pixel accuracy
    (earlier candidates win ties: :func:`mlsys.metrics.worst_candidate`, the rule the
    evaluate stage's curves choose by too), as SEA reports its pixel accuracy.

    x: (N, 3, H, W) clean images (only checked for shape); y: (N, H, W) int64;
    candidates: adversarial batches like x. One forward per candidate. Returns
    (adv (N, 3, H, W), accuracy (N,) of each chosen image, which (N,) int64 index
    of the candidate chosen)."""
    if not candidates:
        raise ValueError("worst_case needs at least one candidate batch, got none")
    if any(c.shape != x.shape for c in candidates):
        raise ValueError(f"candidate shapes {[tuple(c.shape) for c in candidates]} are not {tuple(x.shape)}")
    with eval_mode(model):
        accs = torch.stack([pixel_accuracy(logits_and_grad(model, c, None, amp, grad=False)[0], y)
                            for c in candidates])  # (K, N)
    which = worst_candidate(accs)  # the first minimum
    stacked = torch.stack([c.detach() for c in candidates])  # (K, N, 3, H, W)
    adv = stacked[which, torch.arange(x.shape[0], device=x.device)]
    return adv, accs.gather(0, which[None])[0], which


# SEA's three losses, in the order its worst-case search starts from
SEA_LOSSES = ("mask-ce-bal", "mask-ce", "js")


def sea(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 300, *,
        weights: torch.Tensor | None = None, random_start: bool = True, generator: torch.Generator | None = None,
        on_step: Callable[[str, int, torch.Tensor], None] | None = None,
        amp: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SEA (Croce, Singh & Hein 2023): APGD with the progressive radius schedule, once
    per loss of ``SEA_LOSSES`` (Mask-CE-Bal with class ``weights`` (C,) or per-image
    ones, Mask-CE, JS), plain CE tracked, then the worst case per image.

    x: (N, 3, H, W) in [0, 1]; y: (N, H, W) int64; eps: L-inf radius; steps: per loss
    (SEA: 300). random_start as the authors' inference script (a uniform start in
    the first stage's ball, from ``generator``, drawn anew for each loss).
    on_step(loss name, t, logits) as in ``apgd``. Returns ``worst_case``'s
    (adv, accuracy (N,), which (N,) index into SEA_LOSSES)."""
    losses = {"mask-ce-bal": lambda logits, t: balanced_masked_ce(logits, t, weights),
              "mask-ce": masked_ce, "js": js_divergence}
    candidates = []
    for name in SEA_LOSSES:
        hook = None if on_step is None else (lambda t, logits, name=name: on_step(name, t, logits))
        candidates.append(apgd(model, x, y, eps, steps, loss_fn=losses[name], track_fn=image_ce,
                               schedule=SEA_SCHEDULE, random_start=random_start, generator=generator,
                               on_step=hook, amp=amp))
    return worst_case(model, x, y, candidates, amp=amp)


# --------------------------------------------------------------------------- the protocol's attacks
Attack = Callable[..., torch.Tensor]  # (model, x, y, eps, steps, alpha, generator, on_step, amp) -> adv


def _pgd(model, x, y, eps, steps, alpha, generator, on_step, amp):
    return pgd(model, x, y, mode="standard", eps=eps, alpha=alpha, steps=steps, targeted=False,
               random_start=True, generator=generator, on_step=on_step, amp=amp)


def _segpgd(model, x, y, eps, steps, alpha, generator, on_step, amp):
    return segpgd(model, x, y, eps, alpha, steps, generator=generator, on_step=on_step, amp=amp)


def _cospgd(model, x, y, eps, steps, alpha, generator, on_step, amp):
    return cospgd(model, x, y, eps, alpha, steps, generator=generator, on_step=on_step, amp=amp)


def _apgd(model, x, y, eps, steps, alpha, generator, on_step, amp):
    return apgd(model, x, y, eps, steps, generator=generator, on_step=on_step, amp=amp)


def _sea(model, x, y, eps, steps, alpha, generator, on_step, amp):
    return sea(model, x, y, eps, steps, generator=generator, on_step=on_step, amp=amp)[0]


# The attacks ``evaluate.robust.attacks`` can name: adding one here (with its function) makes
# it a valid choice and re-runs the evaluate stages only (this module is theirs alone).
ATTACKS: dict[str, Attack] = {"pgd": _pgd, "segpgd": _segpgd, "cospgd": _cospgd, "apgd": _apgd, "sea": _sea}


def check(cfg: RobustParams) -> None:
    """A one-line error unless ``evaluate.robust.attacks`` names distinct :data:`ATTACKS`."""
    a = cfg.attacks
    if not a or len(set(a)) != len(a) or not set(a) <= set(ATTACKS):
        raise ParamsError(f"params: evaluate.robust.attacks = {a!r} is invalid; expected distinct names "
                          f"of {list(ATTACKS)}, at least one")


def untargeted(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str, eps: float, steps: int, *,
               alpha: float | None = None, generator: torch.Generator | None = None,
               on_step: OnStep | None = None, amp: bool = False) -> torch.Tensor:
    """One of :data:`ATTACKS` on true masks y at L-inf radius eps; returns the
    adversarial batch. "pgd": standard PGD on the pixel CE with a random start;
    "segpgd", "cospgd": as named; the three take alpha (default eps / 4). "apgd":
    APGD on the CE, one radius; "sea": the worst case of SEA's three runs (on_step
    gets (loss name, t, logits) there). Random starts come from ``generator``."""
    if attack not in ATTACKS:
        raise ValueError(f"attack {attack!r} is not one of {tuple(ATTACKS)}")
    return ATTACKS[attack](model, x, y, eps, steps, alpha if alpha is not None else eps / 4, generator, on_step, amp)
