"""Method one, the paper's first altered training set (paper eq. 2), and its stage.

For each image, a targeted attack toward full-area class c for every class in turn, each
pass starting from the previous pass's output; the final image joins the method-one set
with the image's TRUE mask. The attack is :func:`mlsys.attacks.attack_from_params` with the
``augment.method1`` settings. Run by DVC as ``python -m mlsys.method1 --seed S``.
"""
from __future__ import annotations


import torch

from . import augment, entry, hardware
from .attacks import attack_from_params, check_mode
from .params import Method1Params


def method_one(model: torch.nn.Module, x: torch.Tensor, cfg: Method1Params,
               classes: list[int] | None = None) -> torch.Tensor:
    """Layered targeted attack: x (N, 3, H, W) in [0, 1] -> perturbed batch, after one
    targeted pass toward each class of ``classes`` (default 0..C-1) in turn."""
    classes = list(range(model.head.out_channels)) if classes is None else classes
    for c in classes:
        x = attack_from_params(model, x, cfg, c)
    return x


def settings(cfg, device: torch.device) -> Method1Params:
    """``augment.method1`` with its "auto" fast paths resolved for ``device``: never bf16 in
    the attack loop on a CPU (its gradients would change; :func:`mlsys.hardware.resolve`)."""
    return hardware.resolve(cfg.method1, device, bf16_on_cpu=False)


METHOD = augment.Method(
    name="method1", module="mlsys.method1", settings=settings,
    perturb=lambda model, x, masks, cfg: {"images": method_one(model, x, cfg)},
    check=lambda cfg: check_mode(cfg.mode, "augment.method1.mode"))

if __name__ == "__main__":
    entry.finish(augment.cli(METHOD))
