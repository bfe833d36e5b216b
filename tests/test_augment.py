"""Tests of the two augmentation methods (mlsys.augment) against plain loops: method
two's search against a brute force over all 3^C sign vectors (both scores, both
selections, chunk boundaries, the clean image winning), the per-class directions
against one gradient at a time, and method one against hand-chained PGD passes."""
from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys

import numpy as np

import pytest
import torch
import torch.nn.functional as F

from mlsys.attacks import full_area, input_grad, pgd
from mlsys.method1 import method_one
from mlsys.method2 import class_directions, method_two, neighbours, one_class_effects, screened_scores, search_image, separable_logits
from mlsys.model import UNet
from mlsys.ops import base3_digits, candidates_ref, index_signs
from mlsys.params import Method1Params, Method2Params, Params, ParamsError

SIZE = 8
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def unet(n_classes: int = 6, seed: int = 0) -> UNet:
    """A tiny untrained U-Net with dropout, so an attack that forgot eval mode shows."""
    torch.manual_seed(seed)
    return UNet(n_classes=n_classes, base=4, depth=2, dropout=0.5)


def batch(n: int, n_classes: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 0.1 + 0.8 * torch.rand(n, 3, SIZE, SIZE, generator=g)
    return x, torch.randint(0, n_classes, (n, SIZE, SIZE), generator=g)


def brute_force(model, x, dirs, mask, score):
    """Every sign vector s in {-1, 0, +1}^C by an explicit loop: the candidate
    clip(x + sum_c s_c a_c, 0, 1) and its score against the true mask.
    x: (3, H, W); dirs: (C, 3, H, W); mask: (H, W). Returns {signs: (image, score)}."""
    C = len(dirs)
    signs = list(itertools.product((-1, 0, 1), repeat=C))
    cands = []
    for s in signs:
        xs = x.clone()
        for c in range(C):
            xs = xs + s[c] * dirs[c]
        cands.append(xs.clamp(0, 1))
    cands = torch.stack(cands)
    model.eval()
    with torch.no_grad():
        logits = model(cands)
    if score == "l1":
        onehot = F.one_hot(mask, C).permute(2, 0, 1).float()
        values = (onehot - logits.softmax(1)).abs().mean(dim=(1, 2, 3))
    else:
        picked = logits.log_softmax(1).gather(1, mask.expand(len(signs), 1, *mask.shape))
        values = -picked.mean(dim=(1, 2, 3))
    return {s: (cand, float(v)) for s, cand, v in zip(signs, cands, values)}


# --------------------------------------------------------------------------- method two
@pytest.mark.parametrize("n_classes", [3, 6])
@pytest.mark.parametrize("score, select", [("l1", "argmin"), ("ce", "argmin"), ("l1", "argmax"),
                                           ("ce", "argmax")])
def test_method_two_finds_the_brute_force_best(n_classes, score, select):
    model = unet(n_classes)
    x, masks = batch(2, n_classes)
    # chunk 50 does not divide 27 or 729: the best may sit in any chunk, the last one short
    cfg = Method2Params(eps=0.05, score=score, select=select, chunk=50 if n_classes == 6 else 10,
                        amp=False, channels_last=False)  # the plain fp32 search (fast paths: below)
    model.train()  # method two must evaluate the model regardless
    images, signs, scores, indices = method_two(model, x, masks, cfg)
    assert model.training
    dirs = class_directions(model, x, cfg.eps)
    pick = min if select == "argmin" else max
    for n in range(len(x)):
        table = brute_force(model, x[n], dirs[n], masks[n], score)
        best = pick(v for _, v in table.values())
        assert abs(float(scores[n]) - best) <= 1e-6 * max(1.0, abs(best))
        s = tuple(int(v) for v in signs[n])
        cand, value = table[s]
        assert abs(value - best) <= 1e-6 * max(1.0, abs(best))  # the signs name a best one
        torch.testing.assert_close(images[n], cand, atol=1e-6, rtol=0)
        assert torch.equal(index_signs(indices[n:n + 1], n_classes)[0], signs[n])
    # the search is not trivial: some image is best served by a perturbed candidate
    assert (indices != 0).any()


def test_method_two_output_shapes_and_dtypes():
    C, n = 6, 3
    model = unet(C)
    x, masks = batch(n, C)
    images, signs, scores, indices = method_two(model, x, masks, Method2Params(eps=0.02, chunk=243))
    assert images.shape == (n, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert signs.shape == (n, C) and signs.dtype == torch.int8
    assert set(signs.unique().tolist()) <= {-1, 0, 1}
    assert scores.shape == (n,) and scores.dtype == torch.float32
    assert indices.shape == (n,) and indices.dtype == torch.int64
    assert ((indices >= 0) & (indices < 3**C)).all()
    assert (images - x).abs().amax() <= C * 0.02 + 1e-6


def test_search_keeps_the_clean_image_when_every_perturbation_hurts():
    """Directions a_c = 2^c on every pixel: any non-zero sign vector moves every pixel
    by at least 1, so the candidates are x itself (index 0) and the all-zeros and
    all-ones images. With the mask the model predicts for x, x is the best of them."""
    C = 4
    model = unet(C).eval()
    x = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        mask = model(x[None]).argmax(1)[0]
    dirs = torch.stack([torch.full_like(x, 2.0**c) for c in range(C)])
    table = brute_force(model, x, dirs, mask, "l1")
    clean = table[(0,) * C][1]
    # precondition: every other candidate is a constant image and scores worse
    for s, (cand, value) in table.items():
        if any(s):
            assert cand.unique().numel() == 1 and value > clean + 1e-3
    for chunk in (7, 81):
        idx, value = search_image(model, x, dirs, mask, "l1", "argmin", chunk)
        assert idx == 0 and abs(value - clean) <= 1e-6
        assert (index_signs(torch.tensor([idx]), C) == 0).all()
        # the adversarial selection does move away from the clean image
        idx, value = search_image(model, x, dirs, mask, "l1", "argmax", chunk)
        assert idx != 0 and value > clean


@pytest.mark.parametrize("select", ["argmin", "argmax"])
def test_search_ties_go_to_the_lowest_index(select):
    """A model whose output ignores its input scores every candidate the same: the
    first index (the clean image) must win, across chunk boundaries too."""
    C = 3
    model = unet(C).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.5, -0.2, 0.1]))
    x = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    dirs = 0.1 * torch.randn(C, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6)).sign()
    mask = torch.randint(0, C, (SIZE, SIZE), generator=torch.Generator().manual_seed(7))
    for chunk in (5, 27):
        idx, _ = search_image(model, x, dirs, mask, "l1", select, chunk)
        assert idx == 0


def test_class_directions_match_one_gradient_at_a_time():
    C, eps = 6, 0.03
    model = unet(C)
    x, _ = batch(3, C)
    model.train()
    dirs = class_directions(model, x, eps)
    assert model.training
    assert dirs.shape == (3, C, 3, SIZE, SIZE)
    model.eval()
    for n in range(len(x)):
        xn = x[n:n + 1]
        for c in range(C):
            want = eps * input_grad(model, xn, full_area(xn, c)).sign()[0]
            assert torch.equal(dirs[n, c], want), f"image {n}, class {c}"
    assert ((dirs == 0) | (dirs.abs() == torch.tensor(eps))).all()
    assert (dirs != 0).float().mean() > 0.9


# --------------------------------------------------------------------------- fast paths
def best_of(table, select):
    pick = min if select == "argmin" else max
    return pick(v for _, v in table.values())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("score, select", [("l1", "argmin"), ("ce", "argmax")])
def test_bf16_screen_keeps_the_fp32_optimum(seed, score, select):
    """amp: a bf16-autocast forward (CPU autocast here) screens all candidates, the
    exact_top best are rescored in fp32: the winner's fp32 score is the all-fp32 optimum
    (brute force), on random models."""
    C = 6
    model = unet(C, seed)
    x, masks = batch(2, C, seed + 10)
    base = Method2Params(eps=0.05, score=score, select=select, chunk=100, amp=False,
                         channels_last=False)
    dirs = class_directions(model, x, base.eps)
    for cfg in (dataclasses.replace(base, amp=True, exact_top=8),
                dataclasses.replace(base, amp=True, exact_top=8, channels_last=True)):
        images, signs, scores, indices = method_two(model, x, masks, cfg)
        for n in range(len(x)):
            table = brute_force(model, x[n], dirs[n], masks[n], score)
            best = best_of(table, select)
            assert abs(float(scores[n]) - best) <= 1e-6 * max(1.0, abs(best)), (cfg, n)
            assert abs(table[tuple(signs[n].tolist())][1] - best) <= 1e-6 * max(1.0, abs(best))
            torch.testing.assert_close(images[n], table[tuple(signs[n].tolist())][0], atol=1e-6, rtol=0)


def test_bf16_screen_is_rescored_in_fp32():
    """With exact_top 1 the bf16 screen alone picks the winner, and the score returned is
    still that candidate's fp32 score (not its bf16 one)."""
    C = 6
    model = unet(C, 3).eval()
    x, masks = batch(1, C, 4)
    dirs = class_directions(model, x, 0.05)
    table = brute_force(model, x[0], dirs[0], masks[0], "l1")
    idx, value = search_image(model, x[0], dirs[0], masks[0], "l1", "argmin", 81, amp=True, exact_top=1)
    s = tuple(int(v) for v in index_signs(torch.tensor([idx]), C)[0])
    assert abs(value - table[s][1]) <= 1e-6


@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_search_equals_the_plain_one(channels_last):
    C = 6
    model = unet(C, 5).eval()
    x, masks = batch(2, C, 6)
    dirs = class_directions(model, x, 0.05)
    for n in range(2):
        table = brute_force(model, x[n], dirs[n], masks[n], "l1")
        _, value = search_image(model, x[n], dirs[n], masks[n], "l1", "argmin", 243,
                                channels_last=channels_last)
        assert abs(value - best_of(table, "argmin")) <= 1e-6
    # the model's weights are left in their layout
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.slow
def test_compiled_search_equals_the_plain_one():
    """torch.compile'd forward (CPU inductor: ~30 s to compile)."""
    C = 6
    model = unet(C, 7).eval()
    x, masks = batch(1, C, 8)
    dirs = class_directions(model, x, 0.05)
    table = brute_force(model, x[0], dirs[0], masks[0], "l1")
    _, value = search_image(model, x[0], dirs[0], masks[0], "l1", "argmin", 243, compile=True)
    assert abs(value - best_of(table, "argmin")) <= 1e-5


def exact_scores(table, n_classes):
    """The brute-force table as scores (3^C,) in base-3 index order."""
    return torch.tensor([table[tuple(s.tolist())][1] for s in index_signs(torch.arange(3**n_classes), n_classes)])


class LinearNet(torch.nn.Module):
    """Logits linear in the image; ``head`` as in the U-Net (the searches read the class count there)."""

    def __init__(self, n_classes: int):
        super().__init__()
        self.head = torch.nn.Conv2d(3, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def test_the_separable_guess_is_exact_for_a_linear_model():
    """A 1x1 convolution's logits are linear in the image, so with no pixel clipped the
    one-class effects add up exactly: the guess equals the logits of every candidate, and
    a screened search of one candidate per round finds the exact optimum."""
    C = 4
    torch.manual_seed(0)
    model = LinearNet(C)
    x, masks = batch(1, C, 20)                           # pixels in [0.1, 0.9]: eps 0.02 never clips
    dirs = class_directions(model, x, 0.02)[0]
    with torch.no_grad():
        every = model(candidates_ref(x[0], dirs, 0, 3**C))
    logits = {i: every[i] for i in [5, *neighbours(5, C)]}
    guess = separable_logits(logits[5], one_class_effects(logits, 5, C),
                             base3_digits(torch.arange(3**C), C))
    torch.testing.assert_close(guess, every, atol=1e-5, rtol=1e-5)
    table = brute_force(model, x[0], dirs, masks[0], "l1")
    scores = screened_scores(model, x[0], dirs, masks[0], "l1", "argmin", chunk=7, screen_k=1)
    assert int(scores.argmin()) == int(exact_scores(table, C).argmin())
    assert int(scores.isfinite().sum()) < 3**C


def test_neighbours_change_one_sign():
    signs = index_signs(torch.arange(3**4), 4)
    for i in (0, 17, 80):
        near = neighbours(i, 4)
        assert len(set(near)) == 8
        assert all(int((signs[j] != signs[i]).sum()) == 1 for j in near)


@pytest.mark.parametrize("select", ["argmin", "argmax"])
def test_screened_search_ends_at_a_local_optimum(select):
    """On random U-Nets: the screened winner's score is its brute-force score, no one-sign
    neighbour beats it, far fewer than 3^C candidates are scored; screen_k = 3^C scores
    them all in its first round, which is the exact search."""
    C = 6
    model = unet(C, 11).eval()
    x, masks = batch(2, C, 12)
    dirs = class_directions(model, x, 0.05)
    better = (lambda a, b: a < b - 1e-7) if select == "argmin" else (lambda a, b: a > b + 1e-7)
    for n in range(2):
        exact = exact_scores(brute_force(model, x[n], dirs[n], masks[n], "l1"), C)
        scores = screened_scores(model, x[n], dirs[n], masks[n], "l1", select, 50, screen_k=4)
        done = scores.isfinite()
        torch.testing.assert_close(scores[done], exact[done], atol=1e-6, rtol=0)
        idx, value = search_image(model, x[n], dirs[n], masks[n], "l1", select, 50, search="screened",
                                  screen_k=4)
        assert abs(value - float(exact[idx])) <= 1e-6 and value == pytest.approx(float(
            scores.min() if select == "argmin" else scores.max()), abs=1e-7)
        assert not any(better(float(exact[j]), value) for j in neighbours(idx, C))
        assert 13 <= int(done.sum()) < 3**C // 4
        _, value = search_image(model, x[n], dirs[n], masks[n], "l1", select, 243,
                                search="screened", screen_k=3**C)
        assert abs(value - best_of(brute_force(model, x[n], dirs[n], masks[n], "l1"), select)) <= 1e-6
    with pytest.raises(ValueError, match="search 'greedy' is not one of"):
        search_image(model, x[0], dirs[0], masks[0], search="greedy")


def test_screened_search_with_amp_is_decided_in_fp32():
    C = 6
    model = unet(C, 15).eval()
    x, masks = batch(1, C, 16)
    dirs = class_directions(model, x, 0.05)
    exact = exact_scores(brute_force(model, x[0], dirs[0], masks[0], "l1"), C)
    idx, value = search_image(model, x[0], dirs[0], masks[0], "l1", "argmin", 50, amp=True, exact_top=4,
                              search="screened", screen_k=4)
    assert abs(value - float(exact[idx])) <= 1e-6   # the fp32 score, not the bf16 one


def test_method_two_takes_the_search_settings_from_cfg():
    C = 6
    model = unet(C, 13)
    x, masks = batch(2, C, 14)
    cfg = Method2Params(eps=0.05, chunk=100, search="screened", screen_k=5, amp=True, exact_top=2)
    _, _, scores, indices = method_two(model, x, masks, cfg)
    dirs = class_directions(model, x, cfg.eps)
    for n in range(2):
        want = search_image(model.eval(), x[n], dirs[n], masks[n], "l1", "argmin", 100, amp=True,
                            exact_top=2, search="screened", screen_k=5)
        assert (int(indices[n]), float(scores[n])) == (want[0], pytest.approx(want[1], abs=1e-7))


@pytest.mark.parametrize("key, value, message", [
    ("search", "greedy", r"one of \['exact', 'screened'\]"), ("screen_k", 0, r"1\.\.3\*\*model\.n_classes = 729"),
    ("screen_k", 730, ".*729"), ("exact_top", 0, ">= 1")])
def test_method_two_settings_are_validated(key, value, message):
    from mlsys.method2 import check

    p = Params()
    p.augment.method2.search = "screened"   # screen_k is read (and checked) by the screened search only
    setattr(p.augment.method2, key, value)
    with pytest.raises(ParamsError, match=f"augment.method2.{key} = .* expected {message}"):
        p.validate()
        check(p.augment.method2)  # the choices: checked by method two's own module


def test_the_searches_import_without_yaml_tqdm_h5py_mlflow_dvc():
    """GPU machines lack some packages: the searches and ops must import with torch alone."""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('yaml', 'tqdm', 'h5py', 'mlflow', 'dvc'):\n"
            "            raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from mlsys.method2 import class_directions, search_image, method_two\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("fast", [dict(channels_last=True), dict(amp=True), dict(amp=True, channels_last=True)])
def test_method_one_fast_paths_run_the_same_passes(fast):
    """channels-last (the same arithmetic in another layout) and bf16 autocast (CPU here)
    against the plain fp32 method one. Channels-last differs only where float order flips
    a gradient sign; bf16 moves many signs on an untrained model, so it is held to the
    attack's purpose: the last pass's target loss falls at least half as far."""
    C = 3
    model = unet(C).eval()
    x, _ = batch(4, C)
    plain = Method1Params(eps=0.02, steps=3, channels_last=False)
    want = method_one(model, x, plain)
    got = method_one(model, x, dataclasses.replace(plain, **fast))
    assert got.min() >= 0 and got.max() <= 1 and (got - x).abs().amax() > 0.01
    if not fast.get("amp"):
        assert ((got - want).abs() > 1e-5).float().mean() <= 0.005
    with torch.no_grad():
        loss = [F.cross_entropy(model(z), full_area(z, C - 1)).item() for z in (x, want, got)]
    assert loss[0] - loss[2] >= 0.5 * (loss[0] - loss[1]) > 0, loss
    assert not model.training


# --------------------------------------------------------------------------- method one
@pytest.mark.parametrize("mode", ["faithful", "standard"])
def test_method_one_chains_a_targeted_pass_per_class(mode):
    C = 3
    model = unet(C)
    x, _ = batch(2, C)
    cfg = Method1Params(eps=0.02, alpha=0.01, steps=3, mode=mode, channels_last=False)  # the plain path
    out = method_one(model, x, cfg)
    assert out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().amax() > 0.005
    want = x
    for c in range(C):
        want = pgd(model, want, full_area(want, c), mode=mode, eps=cfg.eps, alpha=cfg.alpha,
                   steps=cfg.steps, targeted=True)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    # the final pass is toward the last class: a single pass toward class 0 differs
    assert not torch.allclose(out, pgd(model, x, full_area(x, 0), mode=mode, eps=cfg.eps,
                                       alpha=cfg.alpha, steps=cfg.steps), atol=1e-4)
    # an explicit class order is followed
    picked = method_one(model, x, cfg, classes=[2, 0])
    want = pgd(model, x, full_area(x, 2), mode=mode, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps)
    want = pgd(model, want, full_area(x, 0), mode=mode, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps)
    torch.testing.assert_close(picked, want, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- the stage's sets
@pytest.mark.parametrize("method", ["method1", "method2"])
def test_method_sets_keep_masks_and_channel_bits(tmp_path, method):
    """The method sets keep the TRUE masks and the raw-channel bits (the "paper"
    metric's truth) of the clean training split; from a clean file without /channels
    (written before it existed) the set has none either."""
    import h5py
    from test_data import fake_fold, write_fold

    from mlsys import data, prepare
    from importlib import import_module

    from mlsys.augment import build_set
    from mlsys.params import AugmentParams, DataParams

    images, masks, types = fake_fold(12, SIZE)
    clean = tmp_path / "clean.h5"
    prepare.prepare(DataParams(source="pannuke", pannuke_path=str(write_fold(tmp_path / "src", 2, images, masks,
                                                                           types)), fold=2), clean, progress=False)
    cfg = AugmentParams(method1=Method1Params(steps=1, batch_size=3), method2=Method2Params(batch_size=3))
    model = unet().eval()
    idx = data.split_of(clean, "train")
    build_set(import_module(f"mlsys.{method}").METHOD, model, clean, tmp_path / "set.h5", cfg, torch.device("cpu"), {}, progress=False)
    _, y, bits = data.load_split(tmp_path / "set.h5", "train", channels=True)
    np.testing.assert_array_equal(bits.numpy(), prepare.channel_bits(masks)[idx])
    np.testing.assert_array_equal(y.numpy(), prepare.semantic_masks(masks)[idx])
    assert (bits.numpy() != prepare.channel_bits(masks)[np.roll(idx, 1)]).any()  # the bits distinguish images
    with h5py.File(clean, "a") as f:
        del f["channels"]
    build_set(import_module(f"mlsys.{method}").METHOD, model, clean, tmp_path / "old.h5", cfg, torch.device("cpu"), {}, progress=False)
    assert not data.has_channels(tmp_path / "old.h5")
    np.testing.assert_array_equal(data.load_split(tmp_path / "old.h5", "train")[1].numpy(), y.numpy())


@pytest.mark.parametrize("method", ["method1", "method2"])
def test_transfer_set_is_the_test_split_perturbed_the_same_way(tmp_path, method):
    """build_set(split="test") -- the augment stage's transfer set -- perturbs the TEST split
    image by image exactly as the method perturbs any batch, keeps its true masks, and holds
    it as the file's test split (no training images)."""
    from importlib import import_module

    from mlsys import data, prepare
    from mlsys.augment import build_set
    from mlsys.params import AugmentParams, DataParams

    clean = tmp_path / "clean.h5"
    prepare.prepare(DataParams(n_images=30, image_size=SIZE), clean, progress=False)
    cfg = AugmentParams(method1=Method1Params(steps=1, batch_size=4), method2=Method2Params(batch_size=4))
    model = unet().eval()
    m = import_module(f"mlsys.{method}").METHOD
    stats = build_set(m, model, clean, tmp_path / "test.h5", cfg, torch.device("cpu"), {}, progress=False,
                      split="test")
    x, y = data.load_split(clean, "test")
    got, got_y = data.load_split(tmp_path / "test.h5", "test")
    assert len(data.split_of(tmp_path / "test.h5", "train")) == 0 and stats["n_images"] == len(x)
    np.testing.assert_array_equal(got_y.numpy(), y.numpy())
    torch.manual_seed(0)  # the set builder seeds each chunk with its index: chunk 0 here
    want = m.perturb(model, x[:4], y[:4], m.settings(cfg, torch.device("cpu")))["images"]
    torch.testing.assert_close(got[:4], want, atol=1e-6, rtol=0)
    assert (got - x).abs().amax() > 0
