"""The U-Net of the paper: shapes, size, learning."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlsys.model import UNet


def conv(cin: int, cout: int, k: int = 3) -> int:
    return cin * cout * k * k + cout


def test_paper_config_shape_and_parameter_count():
    model = UNet(base=64, depth=3)
    # by hand: 3 down sections 64-128-256, a 512 bottleneck, 3 up sections, 1x1 head
    expected = (conv(3, 64) + conv(64, 64) + conv(64, 128) + conv(128, 128) + conv(128, 256) + conv(256, 256)
                + conv(256, 512) + conv(512, 512)
                + conv(512, 256, 2) + conv(512, 256) + conv(256, 256)
                + conv(256, 128, 2) + conv(256, 128) + conv(128, 128)
                + conv(128, 64, 2) + conv(128, 64) + conv(64, 64)
                + conv(64, 6, 1))
    assert sum(p.numel() for p in model.parameters()) == expected == 7_697_670
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 256, 256))
    assert out.shape == (1, 6, 256, 256)


def test_bottleneck_resolution_and_dropout_only_in_up_path():
    model = UNet(base=8, depth=3)
    seen = {}
    model.bottleneck.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    model(torch.rand(2, 3, 64, 64))
    assert seen["shape"] == (2, 64, 8, 8)             # 8x base filters at H/8
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.down.modules())
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.up.modules()) == 3


def test_rejects_size_not_divisible():
    with pytest.raises(ValueError, match="not divisible"):
        UNet(base=4, depth=3)(torch.rand(1, 3, 20, 20))


def test_optimiser_steps_lower_the_loss():
    torch.manual_seed(0)
    model = UNet(base=4, depth=2, dropout=0.0)
    x = torch.rand(4, 3, 16, 16)
    y = (x[:, 0] > 0.5).long() * 2                     # learnable: class from the red channel
    opt = torch.optim.Adam(model.parameters(), lr=0.004)
    first = F.cross_entropy(model(x), y).item()
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
