"""The adversarial-training baselines the field compares against, trained on the clean set by
the one training loop (:func:`mlsys.train.train_model`) with their own per-batch loss.

- PGD-AT (Madry et al. 2018): the pixel cross-entropy of untargeted L-inf PGD examples
  (random start in the eps-ball, ``steps`` signed steps of ``step_size``, projected), on
  the whole batch or, with ``half_clean``, on its first half with the second half clean
  (CosPGD's authors' recipe for segmentation; the halves are random, the order is shuffled).
- TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(p(x) || p(x')), the KL per pixel
  (summed over the classes, averaged over pixels and images); x' maximises that KL by
  ``steps`` signed steps from x + N(0, trades_start^2), projected on the eps-ball.

Both inner attacks run the attacks module's PGD loop (:func:`mlsys.attacks.signed_steps`) on
the bare U-Net in eval mode (no dropout; the TRADES authors' code does the same), and hand
the training loop its train mode back. Radii and steps are on the 0..255 scale, as the
robustness protocol's (eps = radius / 255 on [0, 1] images).

The stage ``train-<pgdat|trades>@<seed>`` runs this module, so the four models' training
stages never depend on attack code (tests/test_layout.py).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import entry, train
from .attacks import pgd, signed_steps
from .model import eval_mode
from .params import BASELINES, AdversarialParams, baseline_label, section_dict

# transform(model, x, y) -> the images the loss sees: x (B, 3, H, W) in [0, 1], y (B, H, W) int64
Transform = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

# the adversarial.* keys each baseline reads (dvc.yaml lists exactly these; tests/test_layout.py)
FIELDS = {"pgdat": ("radius", "steps", "step_size", "half_clean", "epochs"),
          "trades": ("radius", "steps", "step_size", "beta", "trades_start", "epochs")}


def on_inputs(transform: Transform) -> train.BatchLoss:
    """The training loss of transformed inputs: CE(net(transform(model, x, y)), y). With the
    identity transform, exactly the clean loop's loss (tests/test_adversarial.py)."""
    def loss(net, model, x, y):
        return F.cross_entropy(net(transform(model, x, y)), y)
    return loss


def pgd_examples(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """PGD-AT's inner maximisation: untargeted L-inf PGD on the pixel CE from a uniform random
    start in the eps-ball; x (N, 3, H, W) in [0, 1], y (N, H, W) the true mask. The result is
    within eps of x and in [0, 1]."""
    return pgd(model, x, y, mode="standard", eps=eps, alpha=alpha, steps=steps, targeted=False, random_start=True,
               generator=generator)


def pgdat_inputs(cfg: AdversarialParams) -> Transform:
    """The batch PGD-AT trains on: every image attacked, or with ``half_clean`` the first
    ceil(B / 2) attacked and the rest clean (one image: attacked)."""
    eps, alpha = cfg.radius / 255, cfg.step_size / 255

    def transform(model, x, y):
        k = (len(x) + 1) // 2 if cfg.half_clean else len(x)
        adv = pgd_examples(model, x[:k], y[:k], eps, alpha, cfg.steps)
        return torch.cat([adv, x[k:]])
    return transform


def pixel_kl(clean_logits: torch.Tensor, adv_logits: torch.Tensor, per_image: bool = False) -> torch.Tensor:
    """KL(p_clean || p_adv) per pixel, sum_c p_c (log p_c - log q_c) with p = softmax(clean),
    q = softmax(adv) over the classes of logits (N, C, H, W), averaged over the pixels and
    images (a scalar), or over the pixels only (``per_image``: (N,))."""
    logp, logq = F.log_softmax(clean_logits.float(), 1), F.log_softmax(adv_logits.float(), 1)
    kl = (logp.exp() * (logp - logq)).sum(1)  # (N, H, W)
    return kl.flatten(1).mean(1) if per_image else kl.mean()


def trades_examples(model: torch.nn.Module, x: torch.Tensor, eps: float, alpha: float, steps: int, start: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """TRADES' inner maximisation: x' within eps of x (N, 3, H, W) in [0, 1] that maximises
    the per-pixel KL(p(x) || p(x')), from x + N(0, start^2) (the authors' 0.001), by signed
    steps; p(x) from one eval-mode forward, held fixed."""
    x0 = x.detach()
    with eval_mode(model), torch.no_grad():
        clean = model(x0).float()
    noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device)
    adv = (x0 + start * noise).clamp(0, 1)
    return signed_steps(model, x0, adv, lambda t: lambda z: pixel_kl(clean, z, per_image=True), alpha, steps, eps)


def trades_loss(cfg: AdversarialParams) -> train.BatchLoss:
    """TRADES: CE(f(x), y) + beta * pixel_kl(f(x), f(x')), one forward of x and x' together
    (the U-Net has no batch statistics); the KL's gradient reaches both, as the authors'."""
    eps, alpha = cfg.radius / 255, cfg.step_size / 255

    def loss(net, model, x, y):
        adv = trades_examples(model, x, eps, alpha, cfg.steps, cfg.trades_start)
        logits = net(torch.cat([x, adv]))
        clean, robust = logits[:len(x)], logits[len(x):]
        return F.cross_entropy(clean, y) + cfg.beta * pixel_kl(clean, robust)
    return loss


def batch_loss(name: str, cfg: AdversarialParams) -> train.BatchLoss:
    """The per-batch loss of baseline ``name`` (one of params.BASELINES)."""
    if name == "pgdat":
        return on_inputs(pgdat_inputs(cfg))
    if name == "trades":
        return trades_loss(cfg)
    raise ValueError(f"adversarial: unknown baseline {name!r}; expected one of {list(BASELINES)}")


def main(p, name: str, seed: int, relaunch: list[str]) -> None:
    """DVC stage ``train-<name>@<seed>`` of a baseline: the train stage (its outputs, MLflow
    run and resume) with ``adversarial.epochs`` and the baseline's loss; the adversarial
    keys it reads are logged as params and fingerprint its checkpoint."""
    settings = section_dict(p.adversarial)
    extra = {f"adversarial.{k}": settings[k] for k in FIELDS[name]}
    extra["adversarial.label"] = baseline_label(name, p.adversarial)
    train.main(p, name, seed, relaunch, p.adversarial.epochs, batch_loss(name, p.adversarial), extra)


def cli(argv: list[str] | None = None) -> int:
    """``python -m mlsys.adversarial <pgdat|trades> [--seed S]``: the stage as DVC runs it."""
    ap = entry.parser("python -m mlsys.adversarial",
                      "Train an adversarial-training baseline (DVC stage train-<baseline>@<seed>).")
    ap.add_argument("model", choices=list(BASELINES))
    ap.add_argument("--seed", type=int, help=entry.SEED_HELP)
    return entry.main("mlsys train", "mlsys.adversarial", ap,
                      lambda a, p: main(p, a.model, entry.seed_of(a, p), a.relaunch), argv)


if __name__ == "__main__":
    entry.finish(cli())
