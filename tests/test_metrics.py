"""Segmentation metrics against scikit-learn as the oracle."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score, jaccard_score, log_loss

from mlsys.metrics import (STATE_FIELDS, SegMetrics, pack_state, pixel_accuracy, predicted_class, state_accuracy,
                           state_size, unpack_state, worst_candidate)
from mlsys.params import CLASS_NAMES


def batches(seed=0, n=3, size=9):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 6, size, size, generator=g) * 2
    masks = torch.randint(0, 6, (n, size, size), generator=g)
    masks[masks == 4] = 0                      # "dead" absent from the truth ...
    logits[:, 4] -= 100                        # ... and from the prediction
    return logits, masks


def test_standard_metrics_match_sklearn():
    logits, masks = batches()
    m = SegMetrics()
    m.update(logits[:2], masks[:2])            # counts pool over batches
    m.update(logits[2:], masks[2:])
    r = m.result()
    y, p = masks.flatten().numpy(), logits.argmax(1).flatten().numpy()
    assert r["accuracy"] == pytest.approx(accuracy_score(y, p))
    labels = [0, 1, 2, 3, 5]
    dice = f1_score(y, p, labels=labels, average=None)
    jac = jaccard_score(y, p, labels=labels, average=None)
    for c, d, j in zip(labels, dice, jac):
        assert r[f"dice/{CLASS_NAMES[c]}"] == pytest.approx(d)
        assert r[f"jaccard/{CLASS_NAMES[c]}"] == pytest.approx(j)
    # absent class: no score, left out of the macro mean over the nucleus classes
    assert math.isnan(r["dice/dead"]) and r["n_classes_scored"] == 4
    assert r["dice"] == pytest.approx(dice[1:].mean())
    assert r["jaccard"] == pytest.approx(jac[1:].mean())
    probs = logits.softmax(1).permute(0, 2, 3, 1).reshape(-1, 6).double().numpy()
    assert r["loss"] == pytest.approx(log_loss(y, probs, labels=list(range(6))), rel=1e-4)


def test_paper_variant_matches_sklearn_micro_multilabel():
    logits, masks = batches(1)
    m = SegMetrics(threshold=0.1)
    m.update(logits, masks)
    r = m.result()
    fired = (logits.softmax(1) >= 0.1).permute(0, 2, 3, 1).reshape(-1, 6).numpy()
    truth = torch.nn.functional.one_hot(masks, 6).reshape(-1, 6).numpy()
    assert r["paper_dice"] == pytest.approx(f1_score(truth, fired, average="micro"))
    assert r["paper_jaccard"] == pytest.approx(jaccard_score(truth, fired, average="micro"))


def test_merge_equals_single_pass():
    logits, masks = batches(2)
    whole, a, b = SegMetrics(), SegMetrics(), SegMetrics()
    whole.update(logits, masks)
    a.update(logits[:1], masks[:1])
    b.update(logits[1:], masks[1:])
    ra, rw = a.merge(b).result(), whole.result()
    for k in rw:
        assert (math.isnan(rw[k]) and math.isnan(ra[k])) or ra[k] == pytest.approx(rw[k])


def test_state_layout_is_named_and_round_trips():
    """pack_state / unpack_state / from_state agree on one layout: every field where its name
    says, the accuracy of a state that of the metrics, and a wrong length refused."""
    logits, masks = batches(3)
    m = SegMetrics()
    m.update(logits, masks)
    state = torch.from_numpy(m.state())
    assert state.shape == (state_size(6),) == (3 * 6 + 9,)
    u = unpack_state(state)
    assert tuple(u) == STATE_FIELDS
    assert u["pixels"].item() == m.pixels == masks.numel() and u["correct"].item() == m.correct
    assert u["loss_sum"].item() == m.loss_sum and u["paper_raw"].item() == m.paper_raw == 0
    assert u["images"].item() == m.images == 3 and u["miou_image"].item() == m.miou_image > 0
    for k in ("tp", "fp", "fn", "paper"):
        assert u[k].tolist() == getattr(m, k).tolist(), k
    assert torch.equal(pack_state(**u), state)
    assert state_accuracy(state).item() == m.result()["accuracy"]
    back = SegMetrics.from_state(state.numpy(), 6, 0.1)
    assert back.result() == pytest.approx(m.result(), nan_ok=True)
    rows = torch.stack([state, 2 * state]).view(2, 1, -1)  # leading axes are kept
    assert unpack_state(rows)["tp"].shape == (2, 1, 6) and state_accuracy(rows).shape == (2, 1)
    with pytest.raises(ValueError, match="3C \\+ 9"):
        unpack_state(state[:-1])
    with pytest.raises(ValueError, match="has 27 counts"):
        SegMetrics.from_state(state[:-1], 6, 0.1)


def test_pixel_accuracy_and_the_worst_candidate_rule():
    logits, masks = batches(4)
    acc = pixel_accuracy(logits, masks)
    assert acc.shape == (3,) and acc.dtype == torch.float32
    for i in range(3):
        m = SegMetrics()
        m.update(logits[i:i + 1], masks[i:i + 1])
        assert acc[i].item() == pytest.approx(m.result()["accuracy"], abs=1e-7)
    assert predicted_class(logits).tolist() == logits.argmax(1).tolist()
    nan = math.nan
    acc = torch.tensor([[0.5, 0.2, nan, 0.3],
                        [0.5, 0.1, nan, 0.3],  # ties at images 1 and 3: the earlier wins
                        [0.4, 0.1, nan, 0.3]])
    assert worst_candidate(acc).tolist() == [2, 1, 0, 0]  # NaN never chosen unless all are NaN
    assert worst_candidate(acc[:, None]).shape == (1, 4)


# --------------------------------------------------------------------------- the authors' "paper" truth
RAW_ORDER = [1, 2, 3, 4, 5, 0]  # our class id of raw PanNuke channels 0..5 (5 = background)
RAW_OF_OURS = [5, 0, 1, 2, 3, 4]  # raw PanNuke channel of our class ids 0..5


def paper_fold(tmp_path, n: int = 9, size: int = 8):
    """A PanNuke fold written as real .npy files (the importer tests' layout) with many
    void pixels (zero in all six channels) and overlap pixels (two class channels),
    imported by :func:`mlsys.prepare.prepare`. Returns (HDF5 path, raw masks (n, H, W, 6))."""
    from test_data import fake_fold, write_fold

    from mlsys import data, prepare
    from mlsys.params import DataParams

    images, masks, types = fake_fold(n, size)
    rng = np.random.default_rng(5)
    for i in range(3, n):                                  # random nuclei on the later patches
        u = rng.random((size, size))
        cls = rng.integers(0, 5, (size, size))
        for k in range(5):
            hit = (u < 0.4) & (cls == k)
            masks[i, ..., k][hit] = rng.integers(1, 3000, hit.sum())
            masks[i, ..., 5][hit] = 0
        masks[i][(u >= 0.4) & (u < 0.5)] = 0               # void
        over = (u < 0.4) & (rng.random((size, size)) < 0.25)   # a second class channel
        second = (cls + 1 + rng.integers(0, 4, (size, size))) % 5
        for k in range(5):
            masks[i, ..., k][over & (second == k)] = 77.0
    base = write_fold(tmp_path / "src", 2, images, masks, types)
    out = tmp_path / "clean.h5"
    prepare.prepare(DataParams(source="pannuke", pannuke_path=str(base), fold=2, normalise="255"), out,
                 progress=False)
    return out, masks


def authors_counts(prob: np.ndarray, raw: np.ndarray, threshold: float = 0.1) -> tuple[int, int, int]:
    """The original code's pooled counts, re-done in plain numpy from the raw masks.
    prob: (N, 6, H, W) softmax in our class order; raw: (N, H, W, 6) PanNuke masks."""
    p = prob[:, RAW_ORDER].transpose(0, 2, 3, 1)          # -> raw channel order, channels last
    pred = np.where(p < threshold, 0, 1)
    b = (raw != 0).astype(np.int64)                       # binarised instance ids, channel 5 as given
    return int(np.sum(pred + b > 1)), int(np.sum(b - pred < 0)), int(np.sum(b - pred == 1))


def test_channel_bits_follow_the_raw_channels(tmp_path):
    from mlsys import data, prepare

    out, raw = paper_fold(tmp_path)
    bits = data.load_split(out, "train", channels=True)[2]
    idx = data.split_of(out, "train")
    chans = data.unpack_channels(bits).numpy()              # (n, 6, H, W) in our class order
    np.testing.assert_array_equal(chans, (raw[idx] != 0)[..., RAW_OF_OURS].transpose(0, 3, 1, 2))
    void, over = (raw[idx] == 0).all(-1), (raw[idx][..., :5] != 0).sum(-1) == 2
    assert void.sum() > 20 and over.sum() > 10               # the fixture has both cases ...
    assert (bits.numpy()[void] == 0).all()                   # ... void: no channel
    assert (chans.sum(1)[over] == 2).all()                   # ... overlap: two channels


def test_paper_variant_equals_the_authors_counts(tmp_path):
    from mlsys import data, prepare

    out, raw = paper_fold(tmp_path)
    g = torch.Generator().manual_seed(3)
    logits_all = torch.randn(len(raw), 6, 8, 8, generator=g) * 1.5
    m = SegMetrics()
    prob, seen = [], []
    for split in data.SPLITS:                                # every patch, in chunks of 2
        for idx, _, masks, _, bits in data.iter_chunks(out, split, 2, channels=True):
            logits = logits_all[idx]
            m.update(logits, masks, bits)
            prob.append(logits.softmax(1).numpy())
            seen.append(idx)
    tp, fp, fn = authors_counts(np.concatenate(prob), raw[np.concatenate(seen)])
    assert m.paper.tolist() == [tp, fp, fn]
    r = m.result()
    assert r["paper_dice"] == 2 * tp / (2 * tp + fp + fn) and r["paper_jaccard"] == tp / (tp + fp + fn)
    assert r["paper_truth_raw"] == 1.0 and m.paper_truth == "raw channels"
    # state / from_state / merge keep the counts and the truth flag exactly
    back = SegMetrics.from_state(m.state(), 6, 0.1)
    assert back.paper.tolist() == [tp, fp, fn] and back.paper_truth == "raw channels"
    semantic = SegMetrics()
    semantic.update(logits, masks)                           # the last chunk again, without its bits
    assert semantic.paper_truth == "semantic" and back.merge(semantic).paper_truth == "mixed"


def test_evaluate_model_and_evaluate_split_pass_the_bits(tmp_path, one_thread):
    from mlsys import data, prepare
    from mlsys.distributed import ChunkStore
    from mlsys import evaluate
    from mlsys.evaluate import evaluate_split
    from mlsys.metrics import evaluate_model
    from mlsys.model import UNet
    from mlsys.params import AttackParams, EvaluateParams

    out, raw = paper_fold(tmp_path)
    torch.manual_seed(0)
    model = UNet(n_classes=6, base=4, depth=2).eval()
    images, masks, bits = data.load_split(out, "test", channels=True)
    with torch.no_grad():
        prob = model(images).softmax(1).numpy()
    expect = authors_counts(prob, raw[data.split_of(out, "test")])
    r = evaluate_model(model, images, masks, 8, torch.device("cpu"), channels=bits)
    tp, fp, fn = expect
    assert r["paper_dice"] == 2 * tp / (2 * tp + fp + fn) and r["paper_truth_raw"] == 1.0
    cfg = EvaluateParams(attack=AttackParams(steps=1, batch_size=8))
    # a transfer set is scored streamed from its file, one image at a time here, as the split in memory
    assert len(images) > 1
    streamed = evaluate.transfer_result(model, str(out), EvaluateParams(batch_size=1), torch.device("cpu"))
    assert streamed == pytest.approx(r, rel=1e-6, nan_ok=True)  # the loss: float32 sums in another grouping
    cfg.robust.enabled = False  # tests/test_evaluate_robust.py
    clean, attacked, _, _ = evaluate_split(model, str(out), "test", cfg, torch.device("cpu"),
                                           ChunkStore(tmp_path / "store", {}), progress=False)
    assert clean.paper.tolist() == list(expect) and clean.paper_truth == "raw channels"
    assert attacked.paper_truth == "raw channels"
    # a file written before /channels existed: the semantic one-hot, and the result says so
    import h5py
    with h5py.File(out, "a") as f:
        del f["channels"]
    assert data.load_split(out, "test", channels=True)[2] is None
    clean, _, _, _ = evaluate_split(model, str(out), "test", cfg, torch.device("cpu"),
                                    ChunkStore(tmp_path / "store2", {}), progress=False)
    assert clean.paper_truth == "semantic" and clean.result()["paper_truth_raw"] == 0.0
    onehot = np.eye(6)[masks.numpy()].transpose(0, 3, 1, 2)
    fired = prob >= 0.1
    assert clean.paper.tolist() == [(fired & (onehot == 1)).sum(), (fired & (onehot == 0)).sum(),
                                    (~fired & (onehot == 1)).sum()]


@pytest.mark.parametrize("n_classes, with_bits", [(4, False), (6, True)])
def test_threshold_is_inclusive(n_classes, with_bits):
    """Equal logits give every channel exactly the same probability p; with threshold p
    every channel fires (original code: np.where(prob < thr, 0, 1)); with '>' none would."""
    logits = torch.zeros(2, n_classes, 3, 5)
    p = float(logits.softmax(1)[0, 0, 0, 0])                # 0.25 exactly for 4 classes
    assert n_classes != 4 or p == 0.25
    masks = torch.randint(0, n_classes, (2, 3, 5), generator=torch.Generator().manual_seed(0))
    bits = torch.tensor([0, 1, 6, 33, 63, 2], dtype=torch.uint8)[torch.randint(0, 6, (2, 3, 5))] \
        if with_bits else None
    m = SegMetrics(n_classes=n_classes, threshold=p)
    m.update(logits, masks, bits)
    set_ = int(bits.long().apply_(lambda v: bin(v).count("1")).sum()) if with_bits else masks.numel()
    assert m.paper.tolist() == [set_, n_classes * masks.numel() - set_, 0]
    above = SegMetrics(n_classes=n_classes, threshold=float(np.nextafter(np.float32(p), np.float32(1))))
    above.update(logits, masks, bits)
    assert above.paper.tolist() == [0, 0, set_]


def test_raw_vs_semantic_truth_difference(tmp_path):
    """What the raw-channel truth changes against the semantic one-hot on the fixture
    (numbers quoted in mlsys/evaluate.py's docstring): a void pixel's background
    channel stops being truth, an overlap pixel's second class channel becomes truth."""
    from mlsys import data, prepare

    out, raw = paper_fold(tmp_path)
    g = torch.Generator().manual_seed(3)
    raw_m, sem_m, oracle_raw, oracle_sem = SegMetrics(), SegMetrics(), SegMetrics(), SegMetrics()
    delta = np.zeros(3, np.int64)
    for split in data.SPLITS:
        for idx, _, masks, _, bits in data.iter_chunks(out, split, 4, channels=True):
            logits = torch.randn(len(idx), 6, 8, 8, generator=g) * 1.5
            raw_m.update(logits, masks, bits)
            sem_m.update(logits, masks)
            perfect = 20.0 * F.one_hot(masks, 6).permute(0, 3, 1, 2).float()  # the semantic label, sure
            oracle_raw.update(perfect, masks, bits)
            oracle_sem.update(perfect, masks)
            # expected change, pixel by pixel from the raw masks
            fired = (logits.softmax(1) >= 0.1).numpy()
            r = raw[idx]
            void = (r == 0).all(-1)
            d_tp = -(void & fired[:, 0]).sum()               # void, bg fired: TP -> FP
            d_fp = (void & fired[:, 0]).sum()
            d_fn = -(void & ~fired[:, 0]).sum()              # void, bg silent: FN -> TN
            first = masks.numpy()
            for c in range(1, 6):
                extra = (r[..., c - 1] != 0) & (first != c)  # truth only in the raw channels
                d_tp += (extra & fired[:, c]).sum()          # fired: FP -> TP
                d_fp -= (extra & fired[:, c]).sum()
                d_fn += (extra & ~fired[:, c]).sum()         # silent: TN -> FN
            delta += [d_tp, d_fp, d_fn]
    assert (raw_m.paper - sem_m.paper).tolist() == delta.tolist() and (delta != 0).all()
    # the standard variant and every other count do not depend on the truth used
    for k, v in sem_m.result().items():
        if not k.startswith("paper"):
            assert (math.isnan(v) and math.isnan(raw_m.result()[k])) or raw_m.result()[k] == v
    rr, rs = raw_m.result(), sem_m.result()
    print(f"\nfixture: paper_dice raw {rr['paper_dice']:.4f} semantic {rs['paper_dice']:.4f}; "
          f"paper_jaccard raw {rr['paper_jaccard']:.4f} semantic {rs['paper_jaccard']:.4f}; "
          f"semantic-perfect prediction: raw {oracle_raw.result()['paper_dice']:.4f} "
          f"semantic {oracle_sem.result()['paper_dice']:.4f}; void {(raw == 0).all(-1).sum()} "
          f"overlap {((raw[..., :5] != 0).sum(-1) == 2).sum()} of {raw[..., 0].size} pixels")
    assert oracle_sem.result()["paper_dice"] == 1.0 and oracle_raw.result()["paper_dice"] < 1.0


# --------------------------------------------------------------------------- the mIoU family
def one_hot_logits(pred: torch.Tensor, n_classes: int = 6) -> torch.Tensor:
    """Logits (N, C, H, W) whose argmax is pred (N, H, W)."""
    return F.one_hot(pred, n_classes).permute(0, 3, 1, 2).float() * 10


# two 2x3 images, by hand: image A has classes 0, 1, 2; image B classes 0 and 3; class 4 and 5
# are absent from the whole split (truth and prediction), classes 1, 2 from image B, 3 from A
HAND_TRUTH = torch.tensor([[[0, 0, 1], [1, 2, 2]], [[3, 3, 0], [0, 0, 0]]])
HAND_PRED = torch.tensor([[[0, 1, 1], [1, 2, 0]], [[3, 0, 0], [0, 0, 0]]])
# IoU = TP / (TP + FP + FN) per class, counted on the grids above
HAND_IOU_A = {0: 1 / 3, 1: 2 / 3, 2: 1 / 2}           # class 0: TP 1 FP 1 FN 1; 1: 2, 1, 0; 2: 1, 0, 1
HAND_IOU_B = {0: 4 / 5, 3: 1 / 2}                     # class 0: TP 4 FP 1 FN 0; 3: 1, 0, 1
HAND_IOU_SPLIT = {0: 5 / 8, 1: 2 / 3, 2: 1 / 2, 3: 1 / 2}  # pooled: class 0 TP 5 FP 2 FN 1


def hand_mean(ious: dict[int, float], absent: float | None, n_classes: int = 6) -> float:
    """The mean IoU over classes; a class without a union: left out (absent None), else
    counted as ``absent`` (1: "empty = perfect", 0: torchmetrics < 1.4's zero division)."""
    values = [ious.get(c, absent) for c in range(n_classes)]
    values = [v for v in values if v is not None]
    return sum(values) / len(values)


def test_miou_family_equals_a_hand_computation_with_absent_classes():
    """miou (SEA's and RSE's CmIoU: classes absent from the whole split left out), miou_nuclei
    (= jaccard), nmiou (RSE's NmIoU: micro, pooled) and miou_image (per image, absent classes
    left out), on masks counted by hand; the other conventions give other numbers."""
    m = SegMetrics()
    m.update(one_hot_logits(HAND_PRED), HAND_TRUTH)
    r = m.result()
    assert r["miou"] == pytest.approx(hand_mean(HAND_IOU_SPLIT, None)) == pytest.approx((5 / 8 + 2 / 3 + 1) / 4)
    assert r["miou"] != pytest.approx(hand_mean(HAND_IOU_SPLIT, 1.0))   # absent counted as 1: 0.7153
    assert r["miou"] != pytest.approx(hand_mean(HAND_IOU_SPLIT, 0.0))   # absent counted as 0: 0.3819
    nuclei = {c: v for c, v in HAND_IOU_SPLIT.items() if c > 0}
    assert r["miou_nuclei"] == r["jaccard"] == pytest.approx(sum(nuclei.values()) / len(nuclei))
    assert r["nmiou"] == pytest.approx(9 / 15)  # sum TP 9 (correct pixels) over sum of unions 9 + 3 + 3
    assert r["nmiou"] == pytest.approx(r["accuracy"] / (2 - r["accuracy"]))
    per_image = [hand_mean(HAND_IOU_A, None), hand_mean(HAND_IOU_B, None)]  # 0.5, 0.65
    assert per_image == pytest.approx([0.5, 0.65])
    assert r["miou_image"] == pytest.approx(sum(per_image) / 2) == pytest.approx(0.575)
    assert r["miou_image"] != pytest.approx((hand_mean(HAND_IOU_A, 1.0) + hand_mean(HAND_IOU_B, 1.0)) / 2)
    assert r["miou_image"] != pytest.approx((hand_mean(HAND_IOU_A, 0.0) + hand_mean(HAND_IOU_B, 0.0)) / 2)
    assert r["miou_image"] != pytest.approx(r["miou"])  # per image is not pooled


def test_miou_family_matches_sklearn_on_random_masks():
    """Against scikit-learn's jaccard_score: macro over the labels with a union (miou; per
    image: miou_image) and micro over all labels (nmiou)."""
    logits, masks = batches(5, n=4, size=7)
    m = SegMetrics()
    m.update(logits, masks)
    r = m.result()
    y, p = masks.flatten().numpy(), logits.argmax(1).flatten().numpy()
    assert r["miou"] == pytest.approx(jaccard_score(y, p, labels=np.union1d(y, p), average="macro"))
    assert r["nmiou"] == pytest.approx(jaccard_score(y, p, labels=list(range(6)), average="micro"))
    per = []
    for i in range(len(masks)):
        yi, pi = masks[i].flatten().numpy(), logits[i].argmax(0).flatten().numpy()
        per.append(jaccard_score(yi, pi, labels=np.union1d(yi, pi), average="macro"))
    assert r["miou_image"] == pytest.approx(np.mean(per))


def test_per_image_miou_accumulates_over_chunks_as_in_one_pass():
    """The per-image sum and count live in the state: chunks of any size, merged or summed as
    states, give the one-pass miou_image (up to float order); the counts exactly."""
    logits, masks = batches(6, n=5, size=8)
    one = SegMetrics()
    one.update(logits, masks)
    for size in (1, 2, 3):
        parts = []
        for i in range(0, 5, size):
            part = SegMetrics()
            part.update(logits[i:i + size], masks[i:i + size])
            parts.append(part)
        merged = SegMetrics()
        for part in parts:
            merged.merge(part)
        summed = SegMetrics.from_state(np.sum([part.state() for part in parts], 0), 6, 0.1)
        for got in (merged, summed):
            assert got.images == one.images == 5
            assert got.miou_image == pytest.approx(one.miou_image, rel=1e-12)
            assert got.result()["miou_image"] == pytest.approx(one.result()["miou_image"], rel=1e-12)
            for k in ("dice", "accuracy", "jaccard", "miou", "nmiou"):
                assert got.result()[k] == one.result()[k], k  # pooled counts: exact
