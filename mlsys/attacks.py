"""Adversarial attacks on segmentation models: FGSM and iterative PGD in two modes.

FGSM: eta(x, y) = eps * sign(grad_x J(theta, x, y)), J = pixel cross-entropy.
Targeted attacks aim at a "full-area" target (every pixel labelled class c) and
step AGAINST the gradient ("negative epsilon"); untargeted ones step along it.

Iterative attack modes (every result names the one it used):
- "faithful": the authors' code. x <- clip(x - eps * sign(grad), 0, 1) repeated
  ``steps`` times, NO projection: eps is a per-step size and the total change can
  reach steps * eps.
- "standard": PGD (Madry et al.). Step ``alpha``, projection onto the L-inf ball
  of radius ``eps`` around the clean image, clip to [0, 1], optional random start.

Gradients are taken with respect to the input only; the model's parameters get
no gradient and its train/eval mode is restored afterwards.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pixel_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean pixel cross-entropy; logits (N, C, H, W), target (N, H, W) int64."""
    return F.cross_entropy(logits.float(), target)


def full_area(images: torch.Tensor, cls: int) -> torch.Tensor:
    """Target mask (N, H, W) int64 with every pixel labelled ``cls``."""
    n, _, h, w = images.shape
    return torch.full((n, h, w), cls, dtype=torch.int64, device=images.device)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Evaluate the model (dropout off) during an attack; restore its mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def input_grad(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, loss_fn: Loss = pixel_ce,
               amp: bool = False) -> torch.Tensor:
    """grad_x loss(model(x), target) for x (N, 3, H, W); parameters untouched.

    Images do not interact in the U-Net (no batch norm), so each image's gradient
    direction -- all that sign() keeps -- is the same whatever batch it is in."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():  # also inside a caller's torch.no_grad() block
        with torch.autocast(x.device.type, torch.bfloat16, enabled=amp and x.device.type == "cuda"):
            logits = model(x)
        loss = loss_fn(logits, target)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, eps: float, targeted: bool = True,
         loss_fn: Loss = pixel_ce, amp: bool = False) -> torch.Tensor:
    """One FGSM step, clipped to [0, 1]. Targeted: x - eps*sign(grad) toward ``target``;
    untargeted: x + eps*sign(grad) away from ``target`` (the true mask)."""
    with eval_mode(model):
        g = input_grad(model, x, target, loss_fn, amp).sign()
    return (x - eps * g if targeted else x + eps * g).clamp(0, 1).detach()


def pgd(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, *, mode: str = "faithful",
        eps: float = 0.01, alpha: float | None = None, steps: int = 100, targeted: bool = True,
        random_start: bool = False, loss_fn: Loss = pixel_ce, amp: bool = False,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Iterative attack on images x (N, 3, H, W) in [0, 1]; returns the adversarial batch.

    target: (N, H, W) int64 -- the full-area target class mask (targeted) or the true
    mask (untargeted). mode "faithful" steps eps with no projection; "standard" steps
    ``alpha`` (default eps/4) and projects onto the eps-ball around x."""
    if mode not in ("faithful", "standard"):
        raise ValueError(f"attack mode {mode!r} is not 'faithful' or 'standard'")
    sign = -1.0 if targeted else 1.0
    x0 = x.detach()
    step = eps if mode == "faithful" else (alpha if alpha is not None else eps / 4)
    adv = x0.clone()
    if mode == "standard" and random_start:
        noise = torch.rand(x0.shape, generator=generator, device="cpu").to(x0.device) * 2 - 1
        adv = (x0 + eps * noise).clamp(0, 1)
    with eval_mode(model):
        for _ in range(steps):
            g = input_grad(model, adv, target, loss_fn, amp)
            adv = adv + sign * step * g.sign()
            if mode == "standard":
                adv = torch.min(torch.max(adv, x0 - eps), x0 + eps)
            adv = adv.clamp(0, 1).detach()
    return adv


def attack_from_params(model: torch.nn.Module, x: torch.Tensor, cfg, target_class: int) -> torch.Tensor:
    """Targeted attack toward full-area ``target_class`` with settings ``cfg``
    (an AttackParams or Method1Params)."""
    return pgd(model, x, full_area(x, target_class), mode=cfg.mode, eps=cfg.eps,
               alpha=getattr(cfg, "alpha", None), steps=cfg.steps, targeted=True,
               random_start=getattr(cfg, "random_start", False), amp=getattr(cfg, "amp", False))
