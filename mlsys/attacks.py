"""The paper's attacks on segmentation models: FGSM and iterative PGD in two modes, and
the one signed-gradient loop every PGD-like attack of the project runs (the field's attacks
in :mod:`mlsys.robust` included).

FGSM: eta(x, y) = eps * sign(grad_x J(theta, x, y)), J = the mean pixel cross-entropy (``mean_ce``).
Targeted attacks aim at a "full-area" target (every pixel labelled class c) and
step AGAINST the gradient ("negative epsilon"); untargeted ones step along it.

Iterative attack modes (every result names the one it used):
- "faithful": the authors' code. x <- clip(x - eps * sign(grad), 0, 1) repeated
  ``steps`` times, NO projection: eps is a per-step size and the total change can
  reach steps * eps.
- "standard": PGD (Madry et al.). Step ``alpha``, projection onto the L-inf ball
  of radius ``eps`` around the clean image, clip to [0, 1], optional random start.
Every iterative attack takes ``on_step(t, logits)``: it is called with the
logits of the attack's own forward passes (the prediction on the image after t
updates), the last one on the returned image, so curves over the iterations
cost no extra forward.

Gradients are taken with respect to the input only; the model's parameters get
no gradient and its train/eval mode is restored afterwards.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .hardware import use_bf16, use_channels_last
from .model import eval_mode
from .params import ParamsError

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# on_step(t, logits): logits (N, C, H, W) the attack computed on its image after t updates
OnStep = Callable[[int, torch.Tensor], None]


def mean_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel cross-entropy averaged over every pixel of the batch: logits (N, C, H, W),
    target (N, H, W) int64 -> a scalar () float32."""
    return F.cross_entropy(logits.float(), target)


def full_area(images: torch.Tensor, cls: int) -> torch.Tensor:
    """Target mask (N, H, W) int64 with every pixel labelled ``cls``."""
    n, _, h, w = images.shape
    return torch.full((n, h, w), cls, dtype=torch.int64, device=images.device)


def input_grad(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, loss_fn: Loss = mean_ce,
               amp: bool = False) -> torch.Tensor:
    """grad_x loss(model(x), target) for x (N, 3, H, W); parameters untouched.

    Images do not interact in the U-Net (no batch norm), so each image's gradient
    direction -- all that sign() keeps -- is the same whatever batch it is in."""
    return logits_and_grad(model, x, lambda logits: loss_fn(logits, target), amp)[1]


def logits_and_grad(model: torch.nn.Module, x: torch.Tensor, loss_of: Callable[[torch.Tensor], torch.Tensor],
                    amp: bool = False, grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward of x (N, 3, H, W): (logits (N, C, H, W) detached, grad_x of
    loss_of(logits).sum()), or (logits, None) with ``grad=False``. The sum keeps
    a per-image loss (N,) per image: image i's gradient is that of its own loss."""
    x = x.detach().requires_grad_(grad)
    with torch.enable_grad() if grad else torch.no_grad():  # enable: also inside a caller's no_grad()
        with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
            logits = model(x)
        if not grad:
            return logits, None
        loss = loss_of(logits).sum()
    (g,) = torch.autograd.grad(loss, x)
    return logits.detach(), g


def fgsm(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, eps: float, targeted: bool = True,
         loss_fn: Loss = mean_ce, amp: bool = False) -> torch.Tensor:
    """One FGSM step, clipped to [0, 1]. Targeted: x - eps*sign(grad) toward ``target``;
    untargeted: x + eps*sign(grad) away from ``target`` (the true mask)."""
    with eval_mode(model):
        g = input_grad(model, x, target, loss_fn, amp).sign()
    return (x - eps * g if targeted else x + eps * g).clamp(0, 1).detach()


MODES = ("faithful", "standard")  # the iterative attack modes (module docstring)


def check_mode(mode: str, key: str) -> None:
    """A one-line error unless ``mode`` (parameter ``key``) is one of :data:`MODES`."""
    if mode not in MODES:
        raise ParamsError(f"params: {key} = {mode!r} is invalid; expected one of {list(MODES)}")


def uniform_start(x0: torch.Tensor, radius: float, generator: torch.Generator | None) -> torch.Tensor:
    """x0 + U(-radius, radius), clipped to [0, 1]: the random start of every attack. The
    noise is drawn on the CPU, so a seeded generator gives the same start on every device."""
    noise = torch.rand(x0.shape, generator=generator, device="cpu").to(x0.device) * 2 - 1
    return (x0 + radius * noise).clamp(0, 1)


def signed_steps(model: torch.nn.Module, x0: torch.Tensor, adv: torch.Tensor,
                 loss_at: Callable[[int], Callable[[torch.Tensor], torch.Tensor]], step: float, steps: int,
                 radius: float | None = None, on_step: OnStep | None = None, amp: bool = False) -> torch.Tensor:
    """The PGD loop: for t = 0..steps-1, adv <- clip(P(adv + step * sign(grad_x
    loss_at(t)(model(adv)))), 0, 1), P the projection onto the L-inf ball of ``radius``
    around x0 (none when ``radius`` is None). A negative ``step`` descends (targeted
    attacks). on_step(t, logits) sees the logits of each gradient forward, then those of
    one forward of the returned image (the only forward added, and only with on_step)."""
    with eval_mode(model):
        for t in range(steps):
            logits, g = logits_and_grad(model, adv, loss_at(t), amp)
            if on_step is not None:
                on_step(t, logits)
            adv = adv + step * g.sign()
            if radius is not None:
                adv = torch.min(torch.max(adv, x0 - radius), x0 + radius)
            adv = adv.clamp(0, 1).detach()
        if on_step is not None:
            on_step(steps, logits_and_grad(model, adv, None, amp, grad=False)[0])
    return adv


def pgd(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, *, mode: str = "faithful",
        eps: float = 0.01, alpha: float | None = None, steps: int = 100, targeted: bool = True,
        random_start: bool = False, loss_fn: Loss = mean_ce, amp: bool = False,
        generator: torch.Generator | None = None, on_step: OnStep | None = None) -> torch.Tensor:
    """Iterative attack on images x (N, 3, H, W) in [0, 1]; returns the adversarial batch.

    target: (N, H, W) int64 -- the full-area target class mask (targeted) or the true
    mask (untargeted). mode "faithful" steps eps with no projection; "standard" steps
    ``alpha`` (default eps/4) and projects onto the eps-ball around x, from a uniform
    start in it with ``random_start``. on_step as in :func:`signed_steps`."""
    if mode not in MODES:
        raise ValueError(f"attack mode {mode!r} is not one of {MODES}")
    x0 = x.detach()
    standard = mode == "standard"
    step = (alpha if alpha is not None else eps / 4) if standard else eps
    adv = uniform_start(x0, eps, generator) if standard and random_start else x0.clone()
    return signed_steps(model, x0, adv, lambda t: lambda z: loss_fn(z, target), -step if targeted else step,
                        steps, eps if standard else None, on_step, amp)


def attack_from_params(model: torch.nn.Module, x: torch.Tensor, cfg, target_class: int,
                       on_step: OnStep | None = None) -> torch.Tensor:
    """Targeted attack toward full-area ``target_class`` with settings ``cfg`` (an
    AttackParams or Method1Params: mode, eps, alpha, steps, random start, and the fast
    paths amp, channels_last, compile, through :func:`fast`; "auto" ones resolved for x's
    device by :mod:`mlsys.hardware`, bf16 never chosen on a CPU)."""
    net = fast(model, use_channels_last(getattr(cfg, "channels_last", False), x.device), getattr(cfg, "compile", False))
    return pgd(net, x, full_area(x, target_class), mode=cfg.mode, eps=cfg.eps,
               alpha=getattr(cfg, "alpha", None), steps=cfg.steps, targeted=True,
               random_start=getattr(cfg, "random_start", False),
               amp=use_bf16(getattr(cfg, "amp", False), x.device, cpu=False), on_step=on_step)


# --------------------------------------------------------------------------- fast paths
_COMPILED: list[tuple[torch.nn.Module, torch.nn.Module]] = []  # (model, its compiled wrapper)


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(model)``, kept for the last model compiled: a new wrapper per batch
    or image would trace again (the wrapper holds the model, so one only)."""
    if not _COMPILED or _COMPILED[0][0] is not model:
        _COMPILED[:] = [(model, torch.compile(model, dynamic=False))]
    return _COMPILED[0][1]


class FastForward(torch.nn.Module):
    """``model`` computing the same function faster on some hardware: its inputs in
    channels-last layout (NHWC convolutions), its forward torch.compile'd. The attacks take
    it in place of the model, so one attack loop serves every setting; gradients come back
    to the input in the input's own layout, and the model's weights are left alone."""

    def __init__(self, model: torch.nn.Module, channels_last: bool, compile: bool):
        super().__init__()
        self.model = model
        self.channels_last = channels_last
        self.__dict__["run"] = compiled(model) if compile else model  # not a second submodule
        self.train(model.training)  # a new module is in training mode: eval_mode would restore that

    @property
    def head(self) -> torch.nn.Module:  # the class count is read from model.head.out_channels
        return self.model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)


def fast(model: torch.nn.Module, channels_last: bool = False, compile: bool = False) -> torch.nn.Module:
    """The model itself, or a :class:`FastForward` of it."""
    return FastForward(model, channels_last, compile) if channels_last or compile else model
