"""The altered training sets' common work: a method perturbs model 1's training split
chunk by chunk into ``data/seed<s>/<method>.h5`` (true masks kept), resumable and shardable,
and the test split the same way into ``data/seed<s>/<method>_test.h5``, the transferred
perturbation every model is evaluated on (the report's cross-evaluation).

The two methods are their own stage modules, :mod:`mlsys.method1` (the paper's layered
targeted attack) and :mod:`mlsys.method2` (the signed-combination search on the native
ops), each describing itself as a :class:`Method`; this module imports neither, so each
stage executes only its own method's code.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from . import closure, entry, hardware

if TYPE_CHECKING:
    from .distributed import Group, Shard


@dataclass(frozen=True)
class Method:
    """An augmentation method as the set builder runs it."""

    name: str                                   # "method1" / "method2": params section, file and stage name
    module: str                                 # its stage module, whose import closure stamps the chunks
    perturb: Callable[..., dict[str, torch.Tensor]]  # (model, x, masks, settings) -> {"images": ..., extra}
    settings: Callable[[object, torch.device], object]  # (AugmentParams, device) -> its section, "auto" resolved
    check: Callable[[object], None] = lambda cfg: None  # one-line errors for bad settings of its section
    kernels: Callable[[], str | None] = lambda: None    # native kernels' backend and digest (stale: refused)
    columns: Callable[[int], dict[str, tuple] | None] = lambda n_classes: None  # extra per-image datasets


# --------------------------------------------------------------------------- the set
def _model_digest(model: torch.nn.Module) -> str:
    """sha256 of the model's parameters and buffers (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def build_set(method: Method, model: torch.nn.Module, clean: str | os.PathLike, out: str | os.PathLike,
              cfg, device: torch.device, provenance: dict, progress: bool = True, shard: Shard | None = None,
              group: Group | None = None, split: str = "train") -> dict[str, float] | None:
    """Write data/<method>.h5: the ``split`` split of ``clean`` (the training split; "test"
    for the transfer set) perturbed by ``method``, as the same split of ``out``, with the
    settings of its section of ``cfg`` (AugmentParams)
    (true masks and channel bits kept), chunk by chunk (``batch_size`` images). Returns summary
    statistics, or None where this process only computed chunks (a ``shard`` of
    several, or a torchrun rank other than 0).

    Every finished chunk is kept in ``.<out name>.partial/`` beside ``out`` under a
    fingerprint of the inputs (clean data md5, model weights, settings, device type,
    ops backend and kernel digest, the import closure of the method's stage module): a killed run resumes from its last finished chunk, shards computed
    elsewhere are merged, and the dataset is the same bytes as one uninterrupted
    process writes. The folder is removed once ``out`` is complete."""
    from .data import create_dataset, has_channels, image_size, iter_chunks, split_of
    from .distributed import ChunkStore, Shard, chunk_sizes, is_main, run_chunks
    from .files import file_md5

    shard = Shard() if shard is None else shard
    mcfg = method.settings(cfg, device)  # what the fingerprint and the provenance record
    n = len(split_of(clean, split))
    C = model.head.out_channels
    model.to(device)
    out = Path(out)
    main = is_main(group)
    store = ChunkStore(out.with_name(f".{out.name}.partial"), {
        "method": method.name, "split": split, "settings": asdict(mcfg), "n": n, "classes": C,
        "clean_md5": file_md5(clean), "model": _model_digest(model), "device": device.type,
        "ops": method.kernels(),  # backend and csrc/ digest of native kernels, if the method has any
        "code": closure.digest(method.module)}) if main else None

    def compute(batch) -> dict[str, np.ndarray]:
        j, images, masks = batch
        torch.manual_seed(j)  # any random draw: per chunk, the same on any shard
        x, y = images.to(device), masks.to(device)
        return {k: v.cpu().numpy() for k, v in method.perturb(model, x, y, mcfg).items()}

    bs = mcfg.batch_size
    chunks = ((j, (j, images, masks)) for j, (_, images, masks, _) in enumerate(iter_chunks(clean, split, bs)))
    sizes = chunk_sizes(n, bs)
    label = method.name if split == "train" else f"{method.name} ({split})"
    before = run_chunks(chunks, compute, store, shard, group, sizes, label, progress)
    if shard.count > 1 or not main:
        return None

    extra = method.columns(C)
    attrs = {**provenance, "kind": method.name, "source": f"{method.name} of the {split} split of {os.fspath(clean)}",
             "settings": asdict(mcfg), "class_order": list(range(C)),
             "mode": getattr(mcfg, "mode", "signed-combination search")}
    linf, l2 = [], []
    splits = {s: np.arange(n) if s == split else np.arange(0) for s in ("train", "valid", "test")}
    channels = has_channels(clean)  # an older clean file without /channels gives a set without them
    with create_dataset(out, n, image_size(clean), attrs, splits, extra, channels) as w:
        for j, ((idx, images, masks, tissue, bits), result) in enumerate(
                zip(iter_chunks(clean, split, bs, channels=True), store.merged(len(sizes)))):
            if len(result["images"]) != len(idx):
                raise RuntimeError(f"{method.name}: chunk {j} in {store.folder} holds {len(result['images'])} "
                                   f"images, not {len(idx)}")
            w.write(j * bs, masks=masks.to(torch.uint8), tissue=tissue,
                    **({} if bits is None else {"channels": bits}), **result)
            d = (torch.from_numpy(result["images"]) - images).flatten(1)
            linf += d.abs().amax(1).tolist()
            l2 += d.norm(dim=1).tolist()
    store.remove()
    resumed = sum(sizes[j] for j in before)
    if resumed:
        print(f"{label}: resumed {resumed} of {n} images from {store.folder} (an interrupted run's or shards')")
    return {"n_images": float(n), "mean_linf": float(np.mean(linf)), "mean_l2": float(np.mean(l2))}


# --------------------------------------------------------------------------- the augment stage
def main(p, method: Method, seed: int, relaunch: list[str], shard_spec: str | None = None) -> None:
    """DVC stage ``augment-<method>@<seed>``: ``data/seed<seed>/<method>.h5``, the training
    split perturbed with seed ``seed``'s model 1, and ``data/seed<seed>/<method>_test.h5``, the
    test split perturbed the same way (the transfer set of the cross-evaluation), their
    summaries in ``metrics/augment/...`` and one MLflow run. ``shard_spec`` "i/n" computes one shard's chunks only; torchrun ranks
    (``distributed.nproc.augment``) share them; either way the merged file is the same bytes."""
    from .distributed import in_processes
    from .hardware import pick_device

    in_processes(p.distributed.nproc.augment, relaunch, pick_device(p.augment.device), p.distributed.timeout_s,
                 lambda group: _augment_stage(p, method, seed, shard_spec, group))


def cli(method: Method, argv: list[str] | None = None) -> int:
    """``python -m mlsys.<method> [--seed S] [--shard I/N]``: the stage as DVC runs it."""
    ap = entry.parser(f"python -m {method.module}",
                      f"Build the {method.name} training set and transfer test set with model 1 "
                      f"(DVC stage augment-{method.name}@<seed>).")
    ap.add_argument("--seed", type=int, help=entry.SEED_HELP)
    ap.add_argument("--shard", metavar="I/N", help=entry.SHARD_HELP)
    return entry.main("mlsys augment", method.module, ap,
                      lambda a, p: main(p, method, entry.seed_of(a, p), a.relaunch, a.shard), argv)


def _augment_stage(p, method: Method, seed: int, shard_spec: str | None, group) -> None:
    import contextlib

    import mlflow

    from . import figures, paths, tracking
    from .data import head
    from .distributed import Shard, is_main
    from .files import file_md5, require, write_json
    from .hardware import pick_device
    from .metrics import predict
    from .params import section_dict, show_progress
    from .weights import load_weights

    name = method.name

    shard = Shard.parse(shard_spec) if shard_spec else Shard()
    main = is_main(group) and shard.count == 1  # the process that logs and writes
    mcfg = getattr(p.augment, name)
    weights, out, stage = paths.weights("model1", seed), paths.dataset(name, seed), \
        paths.stage_name("augment", name, seed)
    transfer = paths.transfer(name, seed)
    params = {f"augment.{name}.{k}": v for k, v in section_dict(mcfg).items()}
    kernels = method.kernels()
    tags = {"mlsys.stage": "augment", "mlsys.method": name, "mlsys.seed": str(seed),
            **({"mlsys.ops_backend": kernels} if kernels else {})}
    run = tracking.stage_run(stage, params, p.tracking.experiment, tags) if main else contextlib.nullcontext()
    with run:  # a refused stage (bad settings, missing input, stale kernels) ends its run FAILED, leaving nothing
        require(weights, paths.stage_name("train", "model1", seed))
        method.check(mcfg)
        device = group.device if group else pick_device(p.augment.device)
        model = load_weights(weights, p.model).to(device).eval()
        require(paths.CLEAN, "prepare")
        if main:
            tracking.log_dataset(paths.CLEAN, "source")
        provenance = {"producing_model": weights, "producing_model_md5": file_md5(weights),
                      "seed": seed, **({"ops_backend": kernels} if kernels else {}),
                      "device": hardware.describe(device)}
        resolved = method.settings(p.augment, device)  # as build_set runs it
        if main:
            mlflow.log_params(hardware.resolved_params(f"augment.{name}", resolved))
            mlflow.set_tag("mlsys.bf16", hardware.describe(device))
        with tracking.timed("compute"):
            stats = build_set(method, model, paths.CLEAN, out, p.augment, device, provenance, show_progress(),
                              shard, group)
            tested = build_set(method, model, paths.CLEAN, transfer, p.augment, device, provenance,
                               show_progress(), shard, group, split="test")
        if stats is None:
            if shard.count > 1:
                print(f"{stage} shard {shard}: chunks in .{Path(out).name}.partial and .{Path(transfer).name}"
                      ".partial; run without --shard to merge")
            return
        mlflow.log_metrics({**stats, **{f"test/{k}": v for k, v in tested.items()}})
        write_json(paths.augment_metrics(name, seed),
                   {**stats, "test": tested,
                    "fast_paths": {"amp": resolved.amp, "channels_last": resolved.channels_last}})
        tracking.log_dataset(out, "output")
        tracking.log_dataset(transfer, "transfer")
        clean, _ = head(paths.CLEAN, "train", 4)
        pert, masks = head(out, "train", 4)
        logits = predict(model.cpu(), pert, len(pert), torch.device("cpu"))
        mlflow.log_figure(figures.perturbation_panel(clean, pert, masks, logits, f"{name} training set (seed {seed})"),
                          "figures/perturbation_panel.png")
        print(f"{stage}: {out} ({int(stats['n_images'])} images, mean L-inf {stats['mean_linf']:.4f}); "
              f"{transfer} ({int(tested['n_images'])} test images, mean L-inf {tested['mean_linf']:.4f})")
