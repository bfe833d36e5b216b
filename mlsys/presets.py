"""Presets: whole experiments as ``dvc exp run -S`` settings over params.yaml. No stage
imports this module, so editing a preset re-runs nothing; ``mlsys paper`` (mlsys.cli) runs
one."""
from __future__ import annotations


# The paper's experiment as the authors' code runs it (docs/method.md): every choice their code
# settles, as `dvc exp run -S` settings over params.yaml (`mlsys paper`, docs/experiments.md).
PAPER: dict[str, object] = {
    "data.source": "pannuke", "data.fold": 2,            # fold 2: 2523 patches of 256x256
    "data.split": [6, 1, 2], "data.split_seed": 42,      # shuffle seed 42, 6:1:2 -> 1682/280/561
    "data.normalise": "minmax",                          # each image min-max to [0, 1]
    "model.variant": "original", "model.init": "glorot",  # their Keras model; Keras' default init
    "model.base": 64, "model.depth": 3, "model.dropout": 0.2,
    "train.epochs": 60, "train.batch_size": 18, "train.lr": 0.004,
    "train.lr_decay": 0.1, "train.lr_step": 10, "train.schedule": "keras",  # decay before epoch 0
    "train.keep": "best",                                # ModelCheckpoint(save_best_only) on val_loss
    "train.model4_epoch_fraction": 0.3333333333,
    "train.amp": True, "train.channels_last": True,      # bf16 and NHWC in training: CUDA only (ignored on CPU)
    "evaluate.attack.mode": "faithful", "evaluate.attack.steps": 100,  # iterated FGSM, no projection
    "evaluate.attack.eps": 0.01, "evaluate.attack.target": 0,
    "evaluate.attack.amp": "auto", "evaluate.attack.channels_last": "auto",  # bf16 on CUDA (CPU: fp32)
    "augment.method1.mode": "faithful", "augment.method1.steps": 100, "augment.method1.eps": 0.01,
    "augment.method1.amp": "auto", "augment.method1.channels_last": "auto",  # (the field's protocol too)
    "augment.method2.eps": 0.01, "augment.method2.score": "l1", "augment.method2.select": "argmin",
    "augment.method2.search": "exact",                   # all 729 candidates (the paper's search)
    "augment.method2.amp": "auto", "augment.method2.channels_last": "auto",  # bf16 screen, fp32 winner,
    "augment.method2.compile": True,                     # compiled forwards (docs/native-ops.md)
    # beyond the paper: the field's protocol at its usual radii (a GPU job); 300 steps per
    # attack is SEA's own setting per loss (tools/infer.py: "do not change"), fewer is not SEA
    "evaluate.robust.radii": [0.25, 0.5, 1, 2, 4, 8], "evaluate.robust.steps": 300,
}


# The settings of PAPER that only the pooled protocol reads (one fold, split at random):
# `mlsys paper --official` leaves them out rather than set what nothing reads.
POOLED_ONLY = ("data.fold", "data.split", "data.split_seed")


def with_overrides(raw: dict, overrides: dict[str, object]) -> dict:
    """params.yaml's mapping with dotted keys set (as `dvc exp run -S key=value` does)."""
    import copy

    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        node = out
        *parents, last = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return out
