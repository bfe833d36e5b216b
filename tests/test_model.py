"""The U-Net of the paper: shapes, size, learning; the authors' Keras model layer for layer."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mlsys.model import UNet, build_model
from mlsys.params import ModelParams, Params, ParamsError


def conv(cin: int, cout: int, k: int = 3) -> int:
    return cin * cout * k * k + cout


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_standard_unet_shape_and_parameter_count():
    model = UNet(base=64, depth=3, variant="standard")
    # by hand: 3 down sections 64-128-256, a 512 bottleneck, 3 up sections (2x2 transposed conv,
    # double conv), 1x1 head
    expected = (conv(3, 64) + conv(64, 64) + conv(64, 128) + conv(128, 128) + conv(128, 256) + conv(256, 256)
                + conv(256, 512) + conv(512, 512)
                + conv(512, 256, 2) + conv(512, 256) + conv(256, 256)
                + conv(256, 128, 2) + conv(256, 128) + conv(128, 128)
                + conv(128, 64, 2) + conv(128, 64) + conv(64, 64)
                + conv(64, 6, 1))
    assert n_params(model) == expected == 7_697_670
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 256, 256))
    assert out.shape == (1, 6, 256, 256)


def test_original_keras_unet_parameter_count():
    """The authors' model (PokeNet.py): up levels start with a 1x1 stride-2 transposed conv and a
    3x3 conv; the shallowest up level has one conv after the concatenation."""
    model = build_model(ModelParams(base=64, depth=3, n_classes=6, variant="original"))
    expected = (conv(3, 64) + conv(64, 64) + conv(64, 128) + conv(128, 128) + conv(128, 256) + conv(256, 256)
                + conv(256, 512) + conv(512, 512)
                + conv(512, 256, 1) + conv(256, 256) + conv(512, 256) + conv(256, 256)
                + conv(256, 128, 1) + conv(128, 128) + conv(256, 128) + conv(128, 128)
                + conv(128, 64, 1) + conv(64, 64) + conv(128, 64)
                + conv(64, 6, 1))
    assert n_params(model) == expected == 7_919_238
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 6, 64, 64)


def test_original_transposed_conv_puts_pixels_at_even_positions_and_bias_elsewhere():
    """Keras Conv2DTranspose(1x1, strides 2): out[2i, 2j] = W x[i, j] + b, every other pixel = b,
    and the side doubles exactly."""
    torch.manual_seed(0)
    model = UNet(base=3, depth=2, variant="original").eval()
    for level, upsample in enumerate(model.upsample):
        tconv = upsample[0]
        torch.nn.init.normal_(tconv.bias)                    # nonzero, so "bias only" means something
        seen = {}
        tconv.register_forward_hook(lambda m, i, o, seen=seen: seen.update(x=i[0], y=o))
        with torch.no_grad():
            model(torch.rand(2, 3, 12, 20))
        x, y = seen["x"], seen["y"]
        assert y.shape[-2:] == (2 * x.shape[-2], 2 * x.shape[-1]), level
        b = tconv.bias.view(1, -1, 1, 1)
        ref = torch.einsum("nchw,co->nohw", x, tconv.weight[:, :, 0, 0]) + b
        torch.testing.assert_close(y[:, :, ::2, ::2], ref)
        assert torch.equal(y[:, :, 1::2, :], b.expand_as(y[:, :, 1::2, :])), level
        assert torch.equal(y[:, :, :, 1::2], b.expand_as(y[:, :, :, 1::2])), level


def test_original_concatenates_skip_first():
    """Keras: concatenate([skip, up]); the first channels after the concatenation are the skip."""
    model = UNet(base=4, depth=2, variant="original").eval()
    seen = {}
    model.down[0].register_forward_hook(lambda m, i, o: seen.update(skip=o))
    model.up[-1].register_forward_pre_hook(lambda m, i: seen.update(merged=i[0]))
    with torch.no_grad():
        model(torch.rand(1, 3, 16, 16))
    assert torch.equal(seen["merged"][:, :4], seen["skip"])


def test_original_has_two_dropout_layers_in_the_two_deeper_up_levels():
    model = UNet(base=8, depth=3, variant="original")
    where = [i for i, block in enumerate(model.up) for m in block.modules() if isinstance(m, torch.nn.Dropout)]
    assert where == [0, 1]                                # up[0] is the deepest level; the shallowest has none
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 2
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.2, 0.2]
    assert len(model.up[-1]) == 2                         # one 3x3 conv + ReLU after the concatenation
    assert sum(isinstance(m, torch.nn.Dropout) for m in UNet(base=8, depth=1, variant="original").modules()) == 0


def fans(w: torch.Tensor) -> tuple[int, int]:
    area = w.shape[2] * w.shape[3]
    return w.shape[1] * area, w.shape[0] * area            # the sum is the same for conv and transposed conv


@pytest.mark.parametrize("variant", ["original", "standard"])
def test_glorot_init_is_keras_glorot_uniform_with_zero_biases(variant):
    torch.manual_seed(0)
    model = UNet(base=8, depth=2, variant=variant, init="glorot")
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    for m in convs:
        limit = math.sqrt(6 / sum(fans(m.weight)))
        assert m.weight.abs().max() <= limit
        if m.weight.numel() >= 1000:                       # uniform over the whole range, not a narrower init
            assert m.weight.abs().max() > 0.95 * limit
            assert m.weight.std().item() == pytest.approx(limit / math.sqrt(3), rel=0.1)
        assert torch.count_nonzero(m.bias) == 0


def test_he_init_is_kaiming_normal_with_zero_biases():
    torch.manual_seed(0)
    model = UNet(base=8, depth=2, variant="original", init="he")
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.weight.numel() >= 1000:
            assert m.weight.std().item() == pytest.approx(math.sqrt(2 / fans(m.weight)[0]), rel=0.1)
            assert torch.count_nonzero(m.bias) == 0


@pytest.mark.parametrize("variant", ["original", "standard"])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("base", [3, 5])
def test_forward_shapes_on_odd_bases(variant, depth, base):
    model = build_model(ModelParams(base=base, depth=depth, n_classes=4, variant=variant, init="glorot")).eval()
    seen = {}
    model.bottleneck.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    side = 2**depth
    with torch.no_grad():
        out = model(torch.rand(2, 3, 3 * side, 2 * side))
    assert out.shape == (2, 4, 3 * side, 2 * side)
    assert seen["shape"] == (2, base * 2**depth, 3, 2)


@pytest.mark.parametrize("key, value, expected", [
    ("variant", "keras", r"model.variant = 'keras' is invalid; expected one of \['original', 'standard'\]"),
    ("init", "he_normal", r"model.init = 'he_normal' is invalid; expected one of \['glorot', 'he'\]"),
])
def test_unknown_variant_or_init_is_a_params_error(key, value, expected):
    with pytest.raises(ParamsError, match=expected):
        build_model(ModelParams(**{key: value}))


def test_standard_bottleneck_resolution_and_dropout_only_in_up_path():
    model = UNet(base=8, depth=3, variant="standard")
    seen = {}
    model.bottleneck.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    model(torch.rand(2, 3, 64, 64))
    assert seen["shape"] == (2, 64, 8, 8)             # 8x base filters at H/8
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.down.modules())
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.up.modules()) == 3


def test_rejects_size_not_divisible():
    with pytest.raises(ValueError, match="not divisible"):
        UNet(base=4, depth=3)(torch.rand(1, 3, 20, 20))


@pytest.mark.parametrize("variant, init", [("original", "glorot"), ("standard", "he")])
def test_optimiser_steps_lower_the_loss(variant, init):
    torch.manual_seed(0)
    model = UNet(base=4, depth=2, dropout=0.0, variant=variant, init=init)
    x = torch.rand(4, 3, 16, 16)
    y = (x[:, 0] > 0.5).long() * 2                     # learnable: class from the red channel
    opt = torch.optim.Adam(model.parameters(), lr=0.004)
    first = F.cross_entropy(model(x), y).item()
    for _ in range(60):                                # Glorot starts slower than He at base 4
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
