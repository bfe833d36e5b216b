"""Segmentation metrics against scikit-learn as the oracle."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, jaccard_score, log_loss

from mlsys.evaluate import SegMetrics
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
