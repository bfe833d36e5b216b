"""Untargeted L-inf attacks as the segmentation-robustness literature runs them today,
the robustness protocol's attacks (``evaluate.robust``; docs/robustness.md):
- ``segpgd``: PGD on a loss that shifts weight from correctly to wrongly
  classified pixels over the iterations (Gu et al., ECCV 2022).
- ``cospgd``: PGD on the pixel loss weighted by the cosine similarity of
  softmax(logits) and onehot(y) (Agnihotri & Keuper, ICML 2024).
- ``apgd``: APGD (Croce & Hein, ICML 2020) with an optional progressive radius
  schedule, with the step-size rules of the authors' code; with the SEA losses
  (``masked_ce``, ``balanced_masked_ce``, ``js_divergence``) ``sea`` runs SEA
  (Croce, Singh & Hein, 2023): at 300 steps per loss as they do, below that reduced;
  with their early stop.
- ``padam`` (PAdam-CE, PAdam-Cos): projected AMSGrad-Adam on the CE or the cosine
  distance of logits and one-hot truth (Halmosi, Mohos & Jelasity, ECCV 2024).
- ``worst_case``: per image the candidate with the lowest pixel accuracy;
  ``greedy_worst_miou``: SEA's greedy worst case of the dataset's mIoU.
Each runs the loop of :mod:`mlsys.attacks` (``signed_steps``) or its own (APGD, PAdam); on_step
as there. Only the evaluate stage imports this module: a new attack re-runs nothing else.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .attacks import Loss, OnStep, logits_and_grad, pgd, signed_steps, uniform_start
from .metrics import pixel_accuracy, predicted_class, worst_candidate
from .model import eval_mode
from .params import ParamsError, RobustParams


# --------------------------------------------------------------------------- losses
# Losses of an untargeted attack on the true mask y (N, H, W) int64; logits (N, C, H, W).
# Each returns one loss per image (N,): image i's gradient is that of its own loss, so the
# result for an image does not depend on the batch it is in (SEA's early stop aside: ``apgd``).
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


def inverse_frequency(counts: torch.Tensor) -> torch.Tensor:
    """Class weights from pixel counts (C,): 1 / count, normalised to sum 1 over the
    classes counted (classes with no pixel get 0), float32 (C,). SEA's ``VOC_WTS``
    (nmndeep/Robust-Segmentation ``semseg/utils/utils.py``) are these for Pascal VOC's
    training masks: background 0.0007, the 21 summing to 1."""
    count = counts.double()
    w = torch.where(count > 0, 1.0 / count.clamp(min=1), torch.zeros_like(count))
    if not w.sum() > 0:
        raise ValueError("class weights need at least one pixel counted, got none")
    return (w / w.sum()).float()


def class_weights(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``inverse_frequency`` of the pixels of masks y (N, H, W): (n_classes,)."""
    return inverse_frequency(torch.bincount(y.flatten(), minlength=n_classes))


def balanced_masked_ce(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """SEA's Mask-CE-Bal: masked CE with pixel j weighted by weights[y_j] (N,).
    weights: (C,) shared by all images -- SEA's: fixed per dataset, ``inverse_frequency``
    of the training split's pixel counts (the evaluate stage passes those) -- or None:
    each image's own ``class_weights``, a fallback only for data with no training split
    (not SEA's rule; an image's attack then still does not depend on its batch)."""
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
    """The update counts at which APGD checks its step size, as the authors' code counts
    them (fra31/auto-attack ``autopgd_base.py`` and nmndeep/Robust-Segmentation
    ``semseg/attacker.py`` ``apgd_train``): integer windows, the first
    k = max(int(0.22 n), 1), each next one k <- max(k - max(int(0.03 n), 1), max(int(0.06 n), 1)),
    a checkpoint wherever a window ends at or before update n. ``int`` of the same float
    products as there (0.22 * 100 is 22.000000000000004, int 22)."""
    k = max(int(0.22 * n_iter), 1)
    decrease, smallest = max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
    out, w = [], 0
    while w + k <= n_iter:
        w += k
        out.append(w)
        k = max(k - decrease, smallest)
    return out


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
         amp: bool = False, early_stop: bool = False, return_trace: bool = False):
    """APGD (Croce & Hein, ICML 2020), untargeted L-inf, as SEA's code runs it.

    x: (N, 3, H, W) float in [0, 1]; y: (N, H, W) int64 true classes; eps: final
    L-inf radius; steps: updates in all. loss_fn(logits, y) -> (N,) is maximised
    (default: mean pixel CE; SEA: ``masked_ce``, ``balanced_masked_ce``,
    ``js_divergence``); track_fn (default loss_fn) is the loss whose values drive
    the step size and the restarts (SEA tracks plain CE, ``image_ce``).

    schedule: (share of steps, radius / eps) per stage; ``SEA_SCHEDULE`` runs 30% of
    the steps at 2 eps, 30% at 1.5 eps, 40% at eps (``apgd_largereps``). Each stage is
    one run of the authors' ``apgd_train``: it starts from the previous stage's result
    projected onto its ball (the first from x, or x + U(-r, r) with random_start), with
    step eta = 2r, and per image
      z = P(x_k + eta sign(grad)),  x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))
    (a = momentum = 0.75, a = 1 on a stage's first update). The step-size rules are the
    code's (nmndeep/Robust-Segmentation ``semseg/attacker.py``: ``check_oscillation`` and
    the ``counter3 == k`` block of ``apgd_train``; fra31/auto-attack ``autopgd_base.py``
    the same), each verified there:
      - checkpoints: ``apgd_checkpoints`` (integer windows k, shrinking);
      - condition 1: over the window's k updates, count those whose tracked loss rose
        (f_{i} > f_{i-1}, strict) and halve where count <= rho * k. The code keeps the
        losses in a zero-filled buffer and the first window's first comparison reads its
        index -1, an entry not yet written: update 1 is compared with 0, not with the
        start's loss (with a single update it reads itself: never a rise);
      - condition 2: halve where the last check did not halve and the best loss did not
        grow since it (f_best_last >= f_best); skipped at the first checkpoint (the code
        starts its "halved last time" flags at 1);
      - a halving restarts the image at its best-loss point with that point's gradient;
        the previous iterate, and so the momentum term (x_best - x_{k-1}) of the next
        update, and the loss the next update is compared with (the pre-restart one) are
        left as they were.
    A stage's result is, per image, its iterate with the LOWEST pixel accuracy (later
    ones win ties), as SEA keeps; the last stage's result is returned: (N, 3, H, W),
    ||adv - x||_inf <= eps, in [0, 1].

    early_stop: SEA's stop (``apgd_train(early_stop=True)``, as ``tools/infer.py`` runs
    ``apgd_largereps``): a stage ends after the update (its step-size check included) at
    which every image of the BATCH has reached accuracy 0 in the stage (its start counts),
    and returns its lowest-accuracy iterates as they stand; the next stage runs as usual
    (at least one update). The test is on the whole batch, so an image's result depends
    on the images attacked beside it. Off by default: fra31/auto-attack's APGD has no
    such stop inside a run (its restarts only leave out the images already misclassified,
    image by image); a run in which it never fires is the same with it off or on.

    Cost: ``steps`` backward passes and steps + len(schedule) forwards (each stage
    evaluates its start), both fewer where the early stop ends a stage. on_step(t, logits)
    sees every forward in order, t = 0 .. steps + len(schedule) - 1 (with one stage,
    t = number of updates so far); a stage that stops early skips the t of the updates
    it did not run, so every forward has the t it has in a full run. The last one is
    NOT necessarily the returned image (that is the lowest-accuracy one).
    return_trace: also return {"eta": (U, N) step of each update run (U = steps without
    an early stop), "radius": (U,) radius of each, "checkpoints": update counts (global)
    checked}."""
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
            prev = cur
            # the loss update 1 is compared with: the code's unwritten buffer entry (0), or
            # update 1's own loss where the buffer has one entry (never a rise: +inf here)
            f_prev = torch.full_like(f, math.inf if n_iter == 1 else 0.0)
            checks = apgd_checkpoints(n_iter)
            w_last = 0
            halved_last = torch.ones(n, dtype=torch.bool, device=x0.device)  # no condition 2 at the first check
            f_best_last = f_best.clone()
            raised = torch.zeros(n, device=x0.device)                        # updates that raised the loss
            for k in range(n_iter):
                z = project(cur + eta * grad.sign())
                a = 1.0 if k == 0 else momentum  # the code's formula at k = 0 too: cur + (z - cur) may not be z
                prev, cur = cur, project(cur + a * (z - cur) + (1 - a) * (cur - prev)).detach()
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
                    window = k + 1 - w_last
                    halve = (raised <= rho * window) | (~halved_last & (f_best_last >= f_best))
                    w_last, halved_last, f_best_last = k + 1, halve, f_best.clone()
                    raised.zero_()
                    if halve.any():
                        h = halve.view(shape)
                        eta = torch.where(h, eta / 2, eta)
                        cur = torch.where(h, best, cur)  # prev and f_prev stay: the code keeps them
                        if grad is not None:
                            grad = torch.where(h, g_best, grad)
                if early_stop and (low_acc == 0).all():  # the code's ``acc.sum() == 0``, after the check
                    forwards += n_iter - (k + 1)  # the next stage's forwards keep their t
                    break
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
        on_step: Callable[[str, int, torch.Tensor], None] | None = None, amp: bool = False,
        early_stop: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SEA (Croce, Singh & Hein 2023): ``apgd`` (the authors' step-size rules) with the
    progressive radius schedule, once per loss of ``SEA_LOSSES`` (Mask-CE-Bal with the
    dataset's class ``weights`` (C,), Mask-CE, JS), plain CE tracked, then the worst case
    per image by pixel accuracy (``worst_case``; the greedy worst-case mIoU over the same
    runs is ``greedy_worst_miou``).

    x: (N, 3, H, W) in [0, 1]; y: (N, H, W) int64; eps: L-inf radius; steps: per loss.
    SEA is 300 steps per loss (``tools/infer.py``: "do not change"); with fewer this is
    "SEA-style, N steps (reduced)", not SEA's result. weights None: per-image weights, a
    fallback where there is no training split (``balanced_masked_ce``). random_start as
    the authors' inference script (a uniform start in the first stage's ball, from
    ``generator``, drawn anew for each loss). early_stop as the authors run SEA
    (``tools/infer.py``: ``early_stop=True``): each loss's stage ends once every image of
    the batch is at accuracy 0 (``apgd``), so an image's result depends on its batch;
    False runs every update. on_step(loss name, t, logits) as in ``apgd`` (with the stop,
    t skips the updates not run). Returns ``worst_case``'s (adv, accuracy (N,), which
    (N,) index into SEA_LOSSES)."""
    losses = {"mask-ce-bal": lambda logits, t: balanced_masked_ce(logits, t, weights),
              "mask-ce": masked_ce, "js": js_divergence}
    candidates = []
    for name in SEA_LOSSES:
        hook = None if on_step is None else (lambda t, logits, name=name: on_step(name, t, logits))
        candidates.append(apgd(model, x, y, eps, steps, loss_fn=losses[name], track_fn=image_ce,
                               schedule=SEA_SCHEDULE, random_start=random_start, generator=generator,
                               on_step=hook, amp=amp, early_stop=early_stop))
    return worst_case(model, x, y, candidates, amp=amp)


def _miou(inter: np.ndarray, union: np.ndarray) -> float:
    """Mean of inter / union over the classes with union > 0 (``worse_only._compute_miou``)."""
    present = union > 0
    return float(np.mean(inter[present] / union[present]))


def greedy_worst_miou(inter: np.ndarray, union: np.ndarray, rounds: int = 1000,
                      seed: int = 225) -> tuple[float, list[int], int]:
    """The worst-case mIoU over candidate attacks as SEA computes it
    (nmndeep/Robust-Segmentation ``tools/worse_only.py``, ``worst_case_miou``): a greedy
    search for the assignment of one candidate per image that minimises the DATASET's mIoU
    (which per-image choices by accuracy do not).

    inter, union: (K, N, C) per candidate, image and class: pixels of the class predicted
    right, and |true or predicted| of the class. Every image starts at candidate 0 (SEA:
    Mask-CE-Bal). Each round visits the images in an order shuffled by Python's
    ``random.Random(seed)`` (the authors' module seeds ``random`` with 225 and shuffles with
    it; their order matches ours only where nothing else drew from that state first); for
    an image, each candidate k = 0..K-1 in turn is taken when the mIoU with it, over the
    classes whose running union is non-zero (denominator + 1e-8), is below the mIoU as it
    stood when the image's turn began (not the best so far: a later candidate below that
    value replaces an earlier one, as there). Rounds stop when one lowers the mIoU by at
    most 1e-6, or after ``rounds``. The running counts stay one vector per class (the
    authors' lists drop classes of zero union, which shifts the classes after them; the
    two agree wherever every class occurs). Returns (mIoU, chosen candidate per image,
    rounds run)."""
    inter, union = np.asarray(inter, np.float64), np.asarray(union, np.float64)
    if inter.ndim != 3 or inter.shape != union.shape or inter.shape[0] < 1:
        raise ValueError(f"intersections {inter.shape} and unions {union.shape} are not both (K >= 1, N, C)")
    k_all, n, _ = inter.shape
    chosen = [0] * n
    run_i, run_u = inter[0].sum(0), union[0].sum(0)
    final = _miou(run_i, run_u)
    rng, prev_best, done = random.Random(seed), 10.0, 0
    for _ in range(rounds):
        done += 1
        order = list(range(n))
        rng.shuffle(order)
        for idx in order:
            for k in range(k_all):
                new_i = run_i + inter[k, idx] - inter[chosen[idx], idx]
                new_u = run_u + union[k, idx] - union[chosen[idx], idx]
                kept = run_u != 0
                est = float(np.mean(new_i[kept] / (new_u[kept] + 1e-8)))
                if est < final:
                    chosen[idx], run_i, run_u = k, new_i, new_u
            final = _miou(run_i, run_u)
        if prev_best - final <= 1e-6:
            break
        prev_best = final
    return final, chosen, done


# --------------------------------------------------------------------------- PAdam (Halmosi et al.)
def cosine_distance(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PAdam-Cos's loss: 1 - cos(logits, onehot(y)) per pixel, over the class axis of the
    raw LOGITS (not softmax, as szegedai/Robust-Segmentation-Evaluation ``rse/__init__.py``
    writes it), mean per image (N,)."""
    onehot = F.one_hot(y, logits.shape[1]).permute(0, 3, 1, 2).float()
    return _image_mean(1 - F.cosine_similarity(logits.float(), onehot, dim=1))


# The settings of RSE's build_attacks: Adam's step 2/255 whatever the radius; 200 iterations
PADAM_LR = 2 / 255
PADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which RSE keeps
PADAM_EPS = 1e-8


def padam(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 200, *,
          loss_fn: Loss = image_ce, lr: float = PADAM_LR, random_start: bool = True,
          generator: torch.Generator | None = None, on_step: OnStep | None = None,
          amp: bool = False) -> torch.Tensor:
    """PAdam (Halmosi, Mohos & Jelasity, ECCV 2024), as ``padam`` in
    szegedai/Robust-Segmentation-Evaluation ``rse/attacks.py``: projected Adam ascent on the
    perturbation delta, no step-size tuning.

    x: (N, 3, H, W) in [0, 1]; y: (N, H, W) int64; eps: L-inf radius; steps: iterations
    (RSE: 200). delta starts at U(-eps, eps) clipped so x + delta is in [0, 1] (from
    ``generator``), or 0 without random_start; then per iteration t = 1..steps, with
    g = grad_delta loss_fn(model(x + delta), y) (maximised):
      m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,  v_max = max(v_max, v)   (AMSGrad)
      delta += lr / (1 - b1^t) * m / (sqrt(v_max) / sqrt(1 - b2^t) + 1e-8)
      delta = clip(delta, -eps, eps);  delta = clip(x + delta, 0, 1) - x
    -- torch.optim.Adam(lr=2/255, amsgrad=True, maximize=True) as RSE builds it, written
    out. RSE takes the mean of the loss over the whole batch; here each image's own loss
    (``image_ce``: PAdam-CE, ``cosine_distance``: PAdam-Cos), so an image's result does
    not depend on its batch (Adam is scale-free but for its 1e-8). Returns the last
    iterate x + delta (N, 3, H, W), ||delta||_inf <= eps, in [0, 1]. on_step as in
    ``signed_steps``: the logits of each gradient forward, then one of the returned image."""
    _check_attack(x, y, eps, steps)
    if not lr > 0:
        raise ValueError(f"PAdam step lr={lr} is not positive")
    x0 = x.detach()
    delta = (uniform_start(x0, eps, generator) if random_start else x0.clone()) - x0
    m, v, v_max = torch.zeros_like(x0), torch.zeros_like(x0), torch.zeros_like(x0)
    (b1, b2), tiny = PADAM_BETAS, PADAM_EPS
    with eval_mode(model):
        for t in range(1, steps + 1):
            logits, g = logits_and_grad(model, x0 + delta, lambda out: loss_fn(out, y), amp)
            if on_step is not None:
                on_step(t - 1, logits)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            v_max = torch.maximum(v_max, v)
            denom = v_max.sqrt() / math.sqrt(1 - b2 ** t) + tiny
            delta = delta + (lr / (1 - b1 ** t)) * m / denom
            delta = delta.clamp(-eps, eps)
            delta = ((x0 + delta).clamp(0, 1) - x0).detach()
        adv = x0 + delta
        if on_step is not None:
            on_step(steps, logits_and_grad(model, adv, None, amp, grad=False)[0])
    return adv


# --------------------------------------------------------------------------- the protocol's attacks
# (model, x, y, eps, steps, alpha, generator, on_step, amp, weights) -> adv; weights: the
# dataset's class weights (C,) or None, used by SEA's Mask-CE-Bal only
Attack = Callable[..., torch.Tensor]


def _pgd(model, x, y, eps, steps, alpha, generator, on_step, amp, weights):
    return pgd(model, x, y, mode="standard", eps=eps, alpha=alpha, steps=steps, targeted=False,
               random_start=True, generator=generator, on_step=on_step, amp=amp)


def _segpgd(model, x, y, eps, steps, alpha, generator, on_step, amp, weights):
    return segpgd(model, x, y, eps, alpha, steps, generator=generator, on_step=on_step, amp=amp)


def _cospgd(model, x, y, eps, steps, alpha, generator, on_step, amp, weights):
    return cospgd(model, x, y, eps, alpha, steps, generator=generator, on_step=on_step, amp=amp)


def _apgd(model, x, y, eps, steps, alpha, generator, on_step, amp, weights):
    return apgd(model, x, y, eps, steps, generator=generator, on_step=on_step, amp=amp)


def _sea(model, x, y, eps, steps, alpha, generator, on_step, amp, weights):
    return sea(model, x, y, eps, steps, weights=weights, generator=generator, on_step=on_step, amp=amp)[0]


def _padam_ce(model, x, y, eps, steps, alpha, generator, on_step, amp, weights):
    return padam(model, x, y, eps, steps, loss_fn=image_ce, generator=generator, on_step=on_step, amp=amp)


def _padam_cos(model, x, y, eps, steps, alpha, generator, on_step, amp, weights):
    return padam(model, x, y, eps, steps, loss_fn=cosine_distance, generator=generator, on_step=on_step, amp=amp)


# The attacks ``evaluate.robust.attacks`` can name: adding one here (with its function) makes
# it a valid choice and re-runs the evaluate stages only (this module is theirs alone).
ATTACKS: dict[str, Attack] = {"pgd": _pgd, "segpgd": _segpgd, "cospgd": _cospgd, "apgd": _apgd, "sea": _sea,
                              "padam-ce": _padam_ce, "padam-cos": _padam_cos}


# How papers name each attack, and the iterations its authors run (None: no fixed setting).
# Results of fewer iterations carry the reduction in their name (:func:`label`); an attack
# missing here is named by its key.
TITLES: dict[str, tuple[str, int | None]] = {
    "pgd": ("PGD", None), "segpgd": ("SegPGD", None), "cospgd": ("CosPGD", None), "apgd": ("APGD", None),
    "sea": ("SEA", 300),                                # tools/infer.py of SEA's authors: 300 per loss, fixed
    "padam-ce": ("PAdam-CE", 200), "padam-cos": ("PAdam-Cos", 200),  # RSE's setting
}


def label(attack: str, steps: int) -> str:
    """The attack's name with its strength, for tables, plots and tags: "SEA (300 steps)" only
    at its authors' iterations, "SEA-style, 4 steps (reduced from 300)" below them,
    "SegPGD, 4 steps" where the authors fix none."""
    title, full = TITLES.get(attack, (attack, None))
    if full is None:
        return f"{title}, {steps} steps"
    return f"{title} ({steps} steps)" if steps >= full else f"{title}-style, {steps} steps (reduced from {full})"


def check(cfg: RobustParams) -> None:
    """A one-line error unless ``evaluate.robust.attacks`` names distinct :data:`ATTACKS`."""
    a = cfg.attacks
    if not a or len(set(a)) != len(a) or not set(a) <= set(ATTACKS):
        raise ParamsError(f"params: evaluate.robust.attacks = {a!r} is invalid; expected distinct names "
                          f"of {list(ATTACKS)}, at least one")


def untargeted(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str, eps: float, steps: int, *,
               alpha: float | None = None, generator: torch.Generator | None = None,
               on_step: OnStep | None = None, amp: bool = False,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """One of :data:`ATTACKS` on true masks y at L-inf radius eps; returns the
    adversarial batch. "pgd": standard PGD on the pixel CE with a random start;
    "segpgd", "cospgd": as named; the three take alpha (default eps / 4). "apgd":
    APGD on the CE, one radius; "sea": the worst case of SEA's three runs, with its
    authors' early stop (on_step gets (loss name, t, logits) there; ``weights``:
    Mask-CE-Bal's class weights (C,), None for per-image ones); "padam-ce", "padam-cos": PAdam with RSE's step 2/255.
    Random starts come from ``generator``."""
    if attack not in ATTACKS:
        raise ValueError(f"attack {attack!r} is not one of {tuple(ATTACKS)}")
    return ATTACKS[attack](model, x, y, eps, steps, alpha if alpha is not None else eps / 4, generator, on_step, amp,
                           weights)
