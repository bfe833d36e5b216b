"""The prepare stage: ``data/clean.h5`` from the built-in synthetic default or your PanNuke
copy, in the HDF5 format of :mod:`mlsys.data`. Two protocols (``data.protocol``, docs/data.md):
"pooled", one fold split at random (the authors' code: fold 2, seed 42, 6:1:2), and
"official", PanNuke's three folds with train, valid and test each a whole fold, as the field
evaluates (the named splits of ``OFFICIAL_SPLITS`` in mlsys.params follow CellViT's configs).

Raw PanNuke (and the synthetic generator, which mimics it exactly) comes as
  images (N, H, W, 3) float64 whole values 0..255, types (N,) tissue names,
  masks (N, H, W, 6) float64: channels 0..4 instance ids of neoplastic,
  inflammatory, connective, dead, epithelial nuclei (0 = none); channel 5 is 1 on
  background. Some pixels are 0 in all six channels ("void").
Semantic label per pixel: class k+1 for the FIRST channel k in 0..4 that is
non-zero (so a pixel set in two class channels takes the lower channel), else
background 0 -- void pixels are background. Instance ids are compared with 0
before any cast, so ids > 255 are safe.
Channel bits per pixel (what the original code's Dice/Jaccard scores against: the
six raw channels binarised, so void pixels are set in none and overlap pixels in
two): bit c is set where raw channel RAW_CHANNEL[c] is non-zero, c in OUR class
order -- bit 0 background = raw channel 5, bit c = 1..5 = raw channel c - 1.

Run by DVC as ``python -m mlsys.prepare`` (``bin/python``).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import entry
from .data import N_CLASSES, RAW_CHANNEL, SPLITS, DataError, create_dataset, describe_split, head, read_attrs
from .params import CLASS_NAMES, OFFICIAL_SPLITS, DataParams
from .progress import bar as progress_bar


def semantic_masks(raw: np.ndarray) -> np.ndarray:
    """raw: (N, H, W, 6) PanNuke instance masks -> (N, H, W) uint8 class ids 0..5."""
    nucleus = raw[..., :5] != 0                   # compare before any cast: ids exceed 255
    first = nucleus.argmax(axis=-1)               # first non-zero class channel
    return np.where(nucleus.any(axis=-1), first + 1, 0).astype(np.uint8)


def channel_bits(raw: np.ndarray) -> np.ndarray:
    """raw: (N, H, W, 6) PanNuke masks -> (N, H, W) uint8 channel bits 0..63: bit c
    set where raw channel RAW_CHANNEL[c] is non-zero (c = our class id)."""
    bits = np.zeros(raw.shape[:-1], np.uint8)
    for c, k in enumerate(RAW_CHANNEL):
        bits |= (raw[..., k] != 0).astype(np.uint8) << c   # compare before any cast: ids exceed 255
    return bits


def normalise_images(raw: np.ndarray, mode: str) -> np.ndarray:
    """raw: (N, H, W, 3) values 0..255 -> (N, 3, H, W) float32 in [0, 1].

    "minmax" scales each image to [0, 1] (original code; a constant image gives 0),
    "255" divides by 255."""
    x = raw.astype(np.float32)
    if mode == "minmax":
        lo = x.min(axis=(1, 2, 3), keepdims=True)
        span = x.max(axis=(1, 2, 3), keepdims=True) - lo
        x = (x - lo) / np.where(span > 0, span, 1.0)
    elif mode == "255":
        x = x / 255.0
    else:
        raise DataError(f"unknown normalisation {mode!r}; expected 'minmax' or '255'")
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def split_indices(n: int, ratios: list[int], seed: int = 42) -> dict[str, np.ndarray]:
    """Shuffle with ``seed`` and cut train:valid:test by ``ratios`` (original code:
    seed 42, 6:1:2, so 2523 -> 1682/280/561). Each split is returned sorted."""
    total = sum(ratios)
    n_train, n_valid = n * ratios[0] // total, n * ratios[1] // total
    if min(n_train, n_valid, n - n_train - n_valid) < 1:
        need = next(m for m in range(3, 3 * total + 3) if min(m * ratios[0] // total, m * ratios[1] // total,
                                                               m - m * ratios[0] // total - m * ratios[1] // total) >= 1)
        raise DataError(f"params: data.split = {list(ratios)} needs at least {need} images for one image per "
                        f"split; the data hold {n}")
    order = np.random.RandomState(seed).permutation(n)
    parts = np.split(order, [n_train, n_train + n_valid])
    return {name: np.sort(p).astype(np.int64) for name, p in zip(SPLITS, parts)}


def _npy_header(f, name: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        fmt = np.lib.format
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except (zipfile.BadZipFile, zlib.error):  # the zip member itself is damaged: said by the caller
        raise
    except Exception as err:  # noqa: BLE001 - numpy raises several types for bad headers
        raise DataError(f"{name}: not a valid .npy file ({err})") from None
    if fortran:
        raise DataError(f"{name}: Fortran-ordered arrays are not supported")
    if dtype.hasobject:
        raise DataError(f"{name}: holds Python objects (pickled); refusing to load it")
    return shape, dtype


def _npy_chunks(f, name: str, chunk: int) -> Iterator[np.ndarray]:
    """Stream a .npy file object in chunks of ``chunk`` rows (never all in memory)."""
    shape, dtype = _npy_header(f, name)
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    for start in range(0, shape[0], chunk):
        rows = min(chunk, shape[0] - start)
        buf = f.read(rows * row)
        if len(buf) != rows * row:
            raise DataError(f"{name}: truncated (expected {shape[0]} rows of shape {shape[1:]})")
        yield np.frombuffer(buf, dtype=dtype).reshape((rows,) + tuple(shape[1:]))


class PanNukeSource:
    """A user's PanNuke fold: the downloaded zip, the unpacked "Fold N" folder or
    a folder above it. Finds images.npy, masks.npy and types.npy of ``fold``."""

    FILES = ("images", "masks", "types")

    def __init__(self, path: str | os.PathLike, fold: int) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"PanNuke path {self.path} does not exist")
        if self.path.is_dir():
            names = [str(p.relative_to(self.path)) for p in self.path.rglob("*.npy")]
        elif zipfile.is_zipfile(self.path):
            try:
                with zipfile.ZipFile(self.path) as z:
                    names = [n for n in z.namelist() if n.endswith(".npy")]
            except (zipfile.BadZipFile, OSError) as err:
                raise DataError(f"PanNuke path {self.path}: corrupt zip file ({err})") from None
        else:
            raise DataError(f"PanNuke path {self.path} is neither a folder nor a readable zip file "
                            "(truncated download?)")
        self.members = {}
        for key in self.FILES:
            found = [n for n in names if Path(n).name == f"{key}.npy"]
            if len(found) > 1:  # several folds side by side: pick this fold's
                found = [n for n in found if f"fold{fold}" in n.replace(" ", "").lower()]
            if len(found) != 1:
                raise DataError(f"PanNuke path {self.path}: expected one {key}.npy of fold {fold} "
                                f"(e.g. 'Fold {fold}/{'masks' if key == 'masks' else 'images'}/"
                                f"fold{fold}/{key}.npy'), found {len(found)}")
            self.members[key] = found[0]

    @contextlib.contextmanager
    def open(self, key: str):
        member = self.members[key]
        if self.path.is_dir():
            with open(self.path / member, "rb") as f:
                yield f
        else:
            with zipfile.ZipFile(self.path) as z, z.open(member) as f:
                yield io.BufferedReader(f, buffer_size=1 << 22)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: header[0] for key, header in self._headers().items()}

    def dtypes(self) -> dict[str, np.dtype]:
        return {key: header[1] for key, header in self._headers().items()}

    def _headers(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        headers = {}
        for key in self.FILES:
            try:
                with self.open(key) as f:
                    headers[key] = _npy_header(f, f"{self.path}:{self.members[key]}")
            except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                raise DataError(f"{self.path}: corrupt zip file ({err})") from None
        return headers


def check_raw_chunk(images: np.ndarray, masks: np.ndarray, where: str) -> None:
    """Reject values that PanNuke never holds (NaN, negative or fractional ids)."""
    if not np.isfinite(images).all():
        raise DataError(f"{where}: images hold NaN or infinite values")
    if images.min() < 0 or images.max() > 255:
        raise DataError(f"{where}: image values outside 0..255")
    if not np.isfinite(masks).all() or masks.min() < 0 or (masks != np.round(masks)).any():
        raise DataError(f"{where}: masks must hold non-negative whole instance ids")


def checked_chunks(chunks: Iterator[tuple[np.ndarray, np.ndarray]], where: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The (images, masks) chunks of one source, each checked (:func:`check_raw_chunk`) before
    it is passed on; errors name ``where`` and the source's own image numbers."""
    start = 0
    for images, masks in chunks:
        check_raw_chunk(images, masks, f"{where} images {start}..{start + len(images) - 1}")
        start += len(images)
        yield images, masks


def import_raw(chunks: Iterator[tuple[np.ndarray, np.ndarray]], types: np.ndarray,
               out: str | os.PathLike, cfg: DataParams, source: str, image_size: int, where: str,
               progress: bool = True, splits: dict[str, np.ndarray] | None = None,
               provenance: dict | None = None) -> dict[str, int]:
    """Convert raw PanNuke-layout (images, masks) chunks, already checked
    (:func:`checked_chunks`), to the HDF5 dataset at ``out``, one chunk in memory at a time.
    ``splits`` None: the pooled protocol, a random ``cfg.split`` of all images (seed
    ``cfg.split_seed``); else the given split (the official protocol) and ``provenance``
    the attrs that record it."""
    n = len(types)
    attrs = {"source": source, "normalise": cfg.normalise, "n_images": n, "kind": "clean"}
    attrs.update(provenance if splits is not None else
                 {"protocol": "pooled", "split_seed": cfg.split_seed, "split_ratio": cfg.split, **(provenance or {})})
    counts = np.zeros(N_CLASSES, np.int64)
    with create_dataset(out, n, image_size, attrs, None) as w, \
            progress_bar(n, "prepare", "img", progress) as bar:
        w.write(0, tissue=np.asarray(types).astype(str).astype(object))
        start = 0
        for images, masks in chunks:
            sem = semantic_masks(masks)
            counts += np.bincount(sem.ravel(), minlength=N_CLASSES)
            w.write(start, images=normalise_images(images, cfg.normalise), masks=sem,
                    channels=channel_bits(masks))
            start += len(images)
            bar.update(len(images))
        if start != n:
            raise DataError(f"{where}: {start} images and masks but {n} tissue types")
        # the pooled split is cut after every value is checked, so a damaged file is reported as such
        if splits is None:
            splits = split_indices(n, cfg.split, cfg.split_seed)
        w.write_splits(splits)
        w.f.attrs["class_pixel_counts"] = json.dumps(counts.tolist())
    return {name: len(idx) for name, idx in splits.items()}


def open_fold(path: str | os.PathLike, fold: int, named: bool = False) -> tuple[PanNukeSource, int, int]:
    """One PanNuke fold, its arrays' headers checked: (source, number of images, image side).
    ``named``: the fold's files must name it (``fold<N>`` in their path, as PanNuke's own
    ``Fold N/images/foldN/images.npy`` do), so that one fold cannot stand in for another."""
    src = PanNukeSource(path, fold)
    if named:
        for key, member in src.members.items():
            if f"fold{fold}" not in f"{src.path}/{member}".replace(" ", "").lower():
                raise DataError(f"{src.path}: {member} is not fold {fold}'s {key}.npy (expected a path like "
                                f"'Fold {fold}/{'masks' if key == 'masks' else 'images'}/fold{fold}/{key}.npy')")
    shapes, dtypes = src.shapes(), src.dtypes()
    for key, kinds, expected in (("images", "uif", "numbers (PanNuke: float64 0..255)"),
                                 ("masks", "uif", "numbers (PanNuke: float64 instance ids)"),
                                 ("types", "US", "strings (tissue names)")):
        if dtypes[key].kind not in kinds:
            raise DataError(f"{src.path}: {key}.npy has dtype {dtypes[key]}; expected {expected}")
    n = shapes["images"][0]
    if n == 0:
        raise DataError(f"{src.path}: images.npy holds no images")
    if len(shapes["images"]) != 4 or shapes["images"][3] != 3 or shapes["images"][1] != shapes["images"][2]:
        raise DataError(f"{src.path}: images.npy has shape {shapes['images']}; expected (N, H, H, 3)")
    if shapes["masks"] != shapes["images"][:3] + (6,):
        raise DataError(f"{src.path}: masks.npy has shape {shapes['masks']}; expected "
                        f"{shapes['images'][:3] + (6,)} to match images.npy")
    if shapes["types"] != (n,):
        raise DataError(f"{src.path}: types.npy has shape {shapes['types']}; expected ({n},)")
    return src, n, shapes["images"][1]


@contextlib.contextmanager
def _zip_errors(src: PanNukeSource):
    try:
        yield
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:  # a damaged download
        raise DataError(f"{src.path}: corrupt zip file ({err})") from None


def fold_types(src: PanNukeSource, n: int) -> np.ndarray:
    """The (n,) tissue names of a fold."""
    with _zip_errors(src), src.open("types") as f:
        return next(_npy_chunks(f, f"{src.path}:{src.members['types']}", max(n, 1)))


def fold_chunks(src: PanNukeSource) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A fold's (images, masks) in checked chunks of 32 (never the whole fold in memory)."""
    name = {key: f"{src.path}:{member}" for key, member in src.members.items()}
    with _zip_errors(src), src.open("images") as fi, src.open("masks") as fm:
        yield from checked_chunks(zip(_npy_chunks(fi, name["images"], 32), _npy_chunks(fm, name["masks"], 32)),
                                  str(src.path))


def official_splits(sizes: list[int], split: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """PanNuke's official protocol on folds 1, 2, 3 of ``sizes`` images, stored one after
    the other: the indices of each split (all of one fold, in order) and which fold each
    split is (``OFFICIAL_SPLITS[split]``, CellViT's Fold-1..3, mlsys.params)."""
    starts = np.cumsum([0, *sizes])
    folds = dict(zip(SPLITS, OFFICIAL_SPLITS[split]))
    return {name: np.arange(starts[f - 1], starts[f], dtype=np.int64) for name, f in folds.items()}, folds


def prepare_official(cfg: DataParams, out: str | os.PathLike, progress: bool = True) -> dict[str, int]:
    """PanNuke's official protocol: the three folds (``cfg.pannuke_folds``: three paths, or one
    folder holding all three) in one file, fold 1's images first, then fold 2's and fold 3's;
    train, valid and test are whole folds as ``cfg.official_split`` names them. Every fold's
    headers are checked before anything is written."""
    if not cfg.pannuke_folds:
        raise DataError("params: data.pannuke_folds is empty; set it to PanNuke's three folds "
                        "[fold_1.zip, fold_2.zip, fold_3.zip] (zips or unpacked folders) or one folder holding all three")
    if len(cfg.pannuke_folds) not in (1, 3):
        raise DataError(f"params: data.pannuke_folds has {len(cfg.pannuke_folds)} paths; the official protocol "
                        "needs PanNuke's three folds (or one folder holding all three)")
    paths = cfg.pannuke_folds * 3 if len(cfg.pannuke_folds) == 1 else list(cfg.pannuke_folds)
    folds = [open_fold(path, k, named=True) for k, path in zip((1, 2, 3), paths)]
    sizes = {k: size for k, (_, _, size) in zip((1, 2, 3), folds)}
    if len(set(sizes.values())) > 1:
        raise DataError("PanNuke folds have different image sizes: " +
                        ", ".join(f"fold {k} {s}x{s} ({folds[k - 1][0].path})" for k, s in sizes.items()))
    counts = [n for _, n, _ in folds]
    splits, split_folds = official_splits(counts, cfg.official_split)
    types = np.concatenate([fold_types(src, n) for src, n, _ in folds])
    provenance = {"protocol": "official", "official_split": cfg.official_split, "split_folds": split_folds,
                  "fold_paths": [f"{src.path.name}:{src.members['images']}" for src, _, _ in folds], "fold_sizes": counts}
    chunks = (chunk for src, _, _ in folds for chunk in fold_chunks(src))
    return import_raw(chunks, types, out, cfg, f"pannuke:official split {cfg.official_split}", sizes[1],
                      ", ".join(str(src.path) for src, _, _ in folds), progress, splits, provenance)


def prepare(cfg: DataParams, out: str | os.PathLike, progress: bool = True) -> dict[str, int]:
    """Build the clean dataset at ``out``: synthetic (default) or PanNuke, one fold split at
    random (``data.protocol: pooled``, the paper) or the three folds (``official``,
    :func:`prepare_official`)."""
    if cfg.source == "synthetic":
        from .synthetic import generate_chunks, tissue_types

        # streamed: one chunk of 64 patches in memory, whatever n_images
        chunks = generate_chunks(cfg.n_images, cfg.image_size, cfg.synthetic_seed, 64, progress=False)
        return import_raw(checked_chunks(((images, masks) for images, masks, _ in chunks), "synthetic"),
                          tissue_types(cfg.n_images, cfg.synthetic_seed),
                          out, cfg, f"synthetic(seed={cfg.synthetic_seed})", cfg.image_size,
                          "synthetic", progress)
    if cfg.protocol == "official":
        return prepare_official(cfg, out, progress)
    if not cfg.pannuke_path:
        raise DataError("params: data.pannuke_path is empty; set it to your PanNuke fold zip or folder")
    src, n, size = open_fold(cfg.pannuke_path, cfg.fold)
    return import_raw(fold_chunks(src), fold_types(src, n), out, cfg, f"pannuke:{src.path.name}:fold{cfg.fold}",
                      size, str(src.path), progress, provenance={"fold": cfg.fold})


def main(p) -> None:
    """DVC stage ``prepare``: ``data/clean.h5`` from the synthetic default or your PanNuke
    fold (``data`` params), logged as one MLflow run with the class balance and samples."""
    import mlflow

    from . import figures, paths, tracking
    from .params import section_dict, show_progress

    out = paths.CLEAN
    with tracking.stage_run(paths.stage_name("prepare"), {f"data.{k}": v for k, v in section_dict(p.data).items()},
                            p.tracking.experiment, {"mlsys.stage": "prepare"}):
        with tracking.timed("compute"):
            sizes = prepare(p.data, out, show_progress())
        attrs = read_attrs(out)
        counts = np.array(json.loads(attrs["class_pixel_counts"]), dtype=float)
        mlflow.log_metrics({f"split/{k}": v for k, v in sizes.items()})
        mlflow.log_metrics({f"class_fraction/{n}": c / counts.sum() for n, c in zip(CLASS_NAMES, counts)})
        tracking.log_dataset(out, "output")
        images, masks = head(out, "train", 4)
        onehot = torch.nn.functional.one_hot(masks, N_CLASSES).permute(0, 3, 1, 2).float()
        mlflow.log_figure(figures.perturbation_panel(images, images, masks, onehot, "training samples (image, mask)"),
                          "figures/samples.png")
        mlflow.set_tag("mlsys.data", describe_split(attrs))
        print(f"prepare: {out} ({sizes['train']}/{sizes['valid']}/{sizes['test']} train/valid/test; "
              f"{describe_split(attrs)})")


def cli(argv: list[str] | None = None) -> int:
    """``python -m mlsys.prepare``: the stage as DVC runs it."""
    ap = entry.parser("python -m mlsys.prepare",
                      "Build data/clean.h5 from the synthetic default or your PanNuke fold (DVC stage prepare).")
    return entry.main("mlsys prepare", "mlsys.prepare", ap, lambda a, p: main(p), argv)


if __name__ == "__main__":
    entry.finish(cli())
