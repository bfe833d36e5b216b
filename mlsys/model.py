"""The paper's U-Net (Avramidis et al., section 3; original code PokeNet.py).

"Same" 3x3 convolutions, ReLU, ``depth`` max-pooling down sections with filters
base, 2*base, 4*base, ..., a 2^depth*base bottleneck, transposed-convolution
up-sampling, skip connections by concatenation, 20% dropout in the up path only
and a 1x1 convolution to the classes. The network returns logits; the softmax of
the paper lives in the loss and the metrics.

Two variants (``model.variant``):

- ``"original"``: layer for layer the Keras model of the authors' code
  (PokeNet.py ``down_stream``, ``bottelneck``, ``up_stream``). Every up level
  starts with a Conv2DTranspose of a 1x1 kernel and stride 2 (no activation, so
  every odd output row and column is the bias alone) and a 3x3 ReLU conv; then
  concatenation [skip, up]; the deeper up levels go on with 3x3 ReLU conv,
  Dropout, 3x3 ReLU conv, the shallowest with ONE 3x3 ReLU conv and no dropout.
  7,919,238 parameters at base 64, depth 3, 6 classes.
- ``"standard"``: the textbook U-Net the paper's text suggests: 2x2 stride-2
  transposed convs, concatenation [up, skip], a double conv with dropout between
  its convs at every up level. 7,697,670 parameters at base 64, depth 3.

Initialisation (``model.init``): ``"glorot"`` is Keras' default (Glorot-uniform
weights, zero biases), which is what the authors' model actually gets (their
``kernel_initializer='he_normal'`` is set after the layers are built and changes
nothing); ``"he"`` is Kaiming-normal weights (ReLU gain), zero biases.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .params import ParamsError

VARIANTS = ("original", "standard")
INITS = ("glorot", "he")


def double_conv(cin: int, cout: int, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def keras_upsample(cin: int, cout: int) -> nn.Sequential:
    """The authors' up-sampling: Conv2DTranspose(cout, 1x1, strides 2), no activation, then a
    3x3 ReLU conv. (N, cin, h, w) -> (N, cout, 2h, 2w).

    Keras puts input pixel (i, j) at output (2i, 2j) and leaves the other positions at the
    bias; PyTorch's ConvTranspose2d(kernel 1, stride 2) does the same, and output_padding=1
    adds the last odd row and column so that the side doubles exactly as in Keras."""
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 1, stride=2, output_padding=1),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True))


def keras_up_block(cin: int, cout: int, dropout: float, last: bool) -> nn.Sequential:
    """After the concatenation: 3x3 ReLU conv, Dropout, 3x3 ReLU conv; the shallowest
    level (``last``) has one 3x3 ReLU conv only and no dropout (PokeNet.py ``up_stream``)."""
    if last:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True))
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True))


def init_weights(model: nn.Module, init: str) -> None:
    """Every conv and transposed conv: ``"glorot"`` uniform in +-sqrt(6 / (fan_in + fan_out))
    (Keras' glorot_uniform; fan = channels x kernel area) or ``"he"`` Kaiming normal; biases zero."""
    if init not in INITS:
        raise ValueError(f"init {init!r} is unknown; expected one of {INITS}")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            if init == "glorot":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)


class UNet(nn.Module):
    """U-Net for semantic segmentation.

    Args:
        in_channels: image channels (3 for RGB).
        n_classes: output classes (6 for PanNuke: background + 5 nucleus types).
        base: filters of the first section; the paper uses 64.
        depth: number of pooling steps (>= 1); the paper uses 3 (bottleneck at H/8).
        dropout: dropout probability in the up path; the paper uses 0.2.
        variant: "original" (the authors' Keras model) or "standard" (see the module docstring).
        init: "glorot" (Keras default) or "he" (Kaiming normal).
    """

    def __init__(self, in_channels: int = 3, n_classes: int = 6, base: int = 64,
                 depth: int = 3, dropout: float = 0.2, variant: str = "standard", init: str = "he") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant {variant!r} is unknown; expected one of {VARIANTS}")
        if depth < 1:
            raise ValueError(f"depth {depth} is invalid; expected >= 1")
        self.depth, self.variant = depth, variant
        widths = [base * 2**i for i in range(depth + 1)]  # e.g. 64, 128, 256, 512
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths[:-1]:
            self.down.append(double_conv(cin, w))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = double_conv(widths[-2], widths[-1])
        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        for w_in, w_out in zip(widths[:0:-1], widths[-2::-1]):  # deepest level first
            if variant == "original":
                self.upsample.append(keras_upsample(w_in, w_out))
                self.up.append(keras_up_block(2 * w_out, w_out, dropout, last=w_out == widths[0]))
            else:
                self.upsample.append(nn.ConvTranspose2d(w_in, w_out, 2, stride=2))
                self.up.append(double_conv(2 * w_out, w_out, dropout))
        self.head = nn.Conv2d(widths[0], n_classes, 1)
        init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) float in [0, 1], H and W divisible by 2**depth.
        Returns logits (N, n_classes, H, W)."""
        if x.shape[-1] % 2**self.depth or x.shape[-2] % 2**self.depth:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by "
                             f"2**depth = {2**self.depth}")
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        skip_first = self.variant == "original"  # Keras: concatenate([skip, up]); ours: [up, skip]
        for upsample, block, skip in zip(self.upsample, self.up, reversed(skips)):
            up = upsample(x)
            x = block(torch.cat([skip, up] if skip_first else [up, skip], dim=1))
        return self.head(x)


def build_model(cfg) -> UNet:
    """The U-Net described by a :class:`mlsys.params.ModelParams` (a one-line error names a
    variant or init it does not know)."""
    for key, value, known in (("variant", cfg.variant, VARIANTS), ("init", cfg.init, INITS)):
        if value not in known:
            raise ParamsError(f"params: model.{key} = {value!r} is invalid; expected one of {list(known)}")
    return UNet(in_channels=3, n_classes=cfg.n_classes, base=cfg.base, depth=cfg.depth,
                dropout=cfg.dropout, variant=cfg.variant, init=cfg.init)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Evaluate the model (dropout off) during an attack; restore its mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
