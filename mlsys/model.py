"""The paper's U-Net (Avramidis et al., section 3; original code PokeNet.py).

"Same" 3x3 convolutions, ReLU, ``depth`` max-pooling down sections with filters
base, 2*base, 4*base, ..., a 2^depth*base bottleneck, transposed-convolution
up-sampling, skip connections by concatenation, 20% dropout in the up path only,
a 1x1 convolution to the classes and He initialisation. The network returns
logits; the softmax of the paper lives in the loss and the metrics.
"""
from __future__ import annotations

import torch
from torch import nn


def double_conv(cin: int, cout: int, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """U-Net for semantic segmentation.

    Args:
        in_channels: image channels (3 for RGB).
        n_classes: output classes (6 for PanNuke: background + 5 nucleus types).
        base: filters of the first section; the paper uses 64.
        depth: number of pooling steps; the paper uses 3 (bottleneck at H/8).
        dropout: dropout probability in the up path; the paper uses 0.2.
    """

    def __init__(self, in_channels: int = 3, n_classes: int = 6, base: int = 64,
                 depth: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        self.depth = depth
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
        for w_in, w_out in zip(widths[:0:-1], widths[-2::-1]):
            self.upsample.append(nn.ConvTranspose2d(w_in, w_out, 2, stride=2))
            self.up.append(double_conv(2 * w_out, w_out, dropout))
        self.head = nn.Conv2d(widths[0], n_classes, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

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
        for upsample, block, skip in zip(self.upsample, self.up, reversed(skips)):
            x = block(torch.cat([upsample(x), skip], dim=1))
        return self.head(x)


def build_model(cfg) -> UNet:
    """The U-Net described by a :class:`mlsys.params.ModelParams`."""
    return UNet(in_channels=3, n_classes=cfg.n_classes, base=cfg.base, depth=cfg.depth,
                dropout=cfg.dropout)
