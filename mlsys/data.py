"""The dataset format: every dataset of the pipeline is one HDF5 file, written and read
here (:func:`create_dataset` is the one place that writes them):
  /images  (N, 3, H, W) float32 in [0, 1], chunked one image per chunk
  /masks   (N, H, W) uint8 class ids 0..5
  /channels (N, H, W) uint8 channel bits 0..63 (bit c: raw PanNuke channel RAW_CHANNEL[c]
           is non-zero, see mlsys.prepare), chunked like /masks; absent from files written
           before it existed (readers then give None)
  /tissue  (N,) str
  /split/{train,valid,test}  int64 sorted indices
  attrs: provenance (source, seeds, normalisation, producing model, attack settings),
         class_names, overlap_rule, channels_rule (where /channels exists); the clean file
         also the protocol of its split (describe_split): "pooled" (split_ratio, split_seed,
         and for PanNuke the fold) or "official" (official_split, split_folds {split: fold},
         fold_paths and fold_sizes of folds 1..3, whose images follow one another)
The clean file comes from mlsys.prepare; the method sets (mlsys.augment) copy /masks and
/channels of its training split. Files are written beside their destination and renamed on
success (mlsys.files), so a killed stage never leaves a file that looks complete.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator

import h5py
import numpy as np
import torch

from .files import atomic_path
from .params import CLASS_NAMES, InputError

N_CLASSES = len(CLASS_NAMES)
SPLITS = ("train", "valid", "test")
OVERLAP_RULE = "lowest channel wins: a pixel set in two class channels takes the first (0..4)"
# Raw PanNuke channel of each of our class ids 0..5 (ours: 0 background, c = raw c - 1).
RAW_CHANNEL = (5, 0, 1, 2, 3, 4)
CHANNELS_RULE = ("bit c of /channels is set where raw PanNuke channel (5, 0, 1, 2, 3, 4)[c] is "
                 "non-zero; c = our class id (0 background); void pixels have no bit, overlaps two")


class DataError(InputError, ValueError):
    """Input data is missing or malformed; the message names the file and the problem."""


# --------------------------------------------------------------------------- conversion


def unpack_channels(bits: torch.Tensor, n_classes: int = N_CLASSES) -> torch.Tensor:
    """bits: (N, H, W) integer channel bits -> (N, n_classes, H, W) bool, channel c = bit c."""
    shifts = torch.arange(n_classes, device=bits.device).view(1, -1, 1, 1)
    return ((bits.long().unsqueeze(1) >> shifts) & 1) == 1


# --------------------------------------------------------------------------- PanNuke import


# --------------------------------------------------------------------------- outputs


# --------------------------------------------------------------------------- HDF5


class H5Writer:
    """Writes a dataset file image chunk by image chunk (see module docstring)."""

    def __init__(self, f: h5py.File, n: int, size: int, extra: dict[str, tuple] | None = None,
                 channels: bool = True):
        self.f = f
        f.create_dataset("images", (n, 3, size, size), np.float32, chunks=(1, 3, size, size))
        f.create_dataset("masks", (n, size, size), np.uint8, chunks=(1, size, size))
        if channels:
            f.create_dataset("channels", (n, size, size), np.uint8, chunks=(1, size, size))
            f.attrs["channels_rule"] = CHANNELS_RULE
        f.create_dataset("tissue", (n,), h5py.string_dtype())
        for name, (shape, dtype) in (extra or {}).items():
            f.create_dataset(name, (n,) + tuple(shape), dtype)

    def write_splits(self, splits: dict[str, np.ndarray]) -> None:
        for name, idx in splits.items():
            self.f.create_dataset(f"split/{name}", data=np.asarray(idx, dtype=np.int64))

    def write(self, start: int, **arrays) -> None:
        for name, value in arrays.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            self.f[name][start:start + len(value)] = value


@contextlib.contextmanager
def create_dataset(path: str | os.PathLike, n: int, size: int, attrs: dict,
                   splits: dict[str, np.ndarray] | None, extra: dict[str, tuple] | None = None,
                   channels: bool = True):
    """Open a new dataset file for writing; it appears at ``path`` only on success.
    ``splits`` None: the caller writes them later (``H5Writer.write_splits``).
    ``channels``: the file gets /channels (the writer must fill it); False only for a
    file made from an older one that has none."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        w = H5Writer(f, n, size, extra, channels)
        if splits is not None:
            w.write_splits(splits)
        for key, value in attrs.items():
            f.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
        f.attrs["class_names"] = json.dumps(CLASS_NAMES)
        f.attrs["overlap_rule"] = OVERLAP_RULE
        yield w


# --------------------------------------------------------------------------- reading
def _open(path: str | os.PathLike) -> h5py.File:
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise DataError(f"dataset {path} does not exist") from None
    except OSError as err:
        raise DataError(f"dataset {path} is not a readable HDF5 file ({err})") from None
    try:
        _check_layout(f, path)
    except DataError:
        f.close()
        raise
    except (OSError, ValueError, KeyError) as err:  # damaged metadata
        f.close()
        raise DataError(f"dataset {path} is corrupt ({err})") from None
    return f


def _check_layout(f: h5py.File, path) -> None:
    """The layout of the module docstring: names, ranks, dtypes, counts, split indices."""
    for name in ("images", "masks", "tissue", "split/train", "split/valid", "split/test"):
        if name not in f or not isinstance(f[name], h5py.Dataset):
            raise DataError(f"dataset {path} has no '{name}'; rebuild it with `mlsys prepare`")
    images, masks, tissue = f["images"], f["masks"], f["tissue"]
    n = images.shape[0] if images.ndim else 0
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.float32:
        raise DataError(f"dataset {path}: images are {images.dtype} {images.shape}; "
                        "expected float32 (N, 3, H, W)")
    if masks.shape != (n,) + images.shape[2:] or masks.dtype != np.uint8:
        raise DataError(f"dataset {path}: masks are {masks.dtype} {masks.shape}; "
                        f"expected uint8 {(n,) + images.shape[2:]} to match the images")
    if tissue.shape != (n,):
        raise DataError(f"dataset {path}: tissue has shape {tissue.shape}; expected ({n},)")
    if "channels" in f and (f["channels"].shape != masks.shape or f["channels"].dtype != np.uint8):
        raise DataError(f"dataset {path}: channels are {f['channels'].dtype} {f['channels'].shape}; "
                        f"expected uint8 {masks.shape} like the masks")
    for split in SPLITS:
        idx = f[f"split/{split}"][:]
        if idx.ndim != 1 or idx.dtype.kind not in "iu" or (len(idx) and (idx.min() < 0 or idx.max() >= n)):
            raise DataError(f"dataset {path}: split/{split} must hold image indices in 0..{n - 1}")


def read_attrs(path: str | os.PathLike) -> dict:
    with _open(path) as f:
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}


def describe_split(attrs: dict) -> str:
    """Which data and which protocol made a dataset's split, in words, from its attrs
    (:func:`read_attrs` of the clean file): "PanNuke official split 1 (train fold 1, valid
    fold 2, test fold 3)", "PanNuke fold 2, pooled 6:1:2 at random (seed 42)" or
    "synthetic(seed=0), pooled 6:1:2 at random (seed 42)"."""
    source = str(attrs.get("source", "unknown source"))
    if attrs.get("protocol") == "official":
        folds = json.loads(attrs["split_folds"])
        return (f"PanNuke official split {attrs['official_split']} (train fold {folds['train']}, "
                f"valid fold {folds['valid']}, test fold {folds['test']})")
    ratio = ":".join(map(str, json.loads(attrs["split_ratio"]))) if "split_ratio" in attrs else "?"
    pooled = f"pooled {ratio} at random (seed {attrs.get('split_seed', '?')})"
    if source.startswith("pannuke:"):
        fold = attrs.get("fold", source.rsplit(":fold", 1)[-1])  # files from before the attr: the source names it
        return f"PanNuke fold {fold}, {pooled}"
    return f"{source}, {pooled}"


def split_of(path: str | os.PathLike, split: str) -> np.ndarray:
    with _open(path) as f:
        return f[f"split/{split}"][:]


def split_tissues(path: str | os.PathLike, split: str) -> list[str]:
    """The sorted tissue names of a split's images (HDF5 /tissue)."""
    with h5py.File(path, "r") as f:
        names = f["tissue"].asstr()[:]
    return sorted(set(names[split_of(path, split)].tolist()))


def has_channels(path: str | os.PathLike) -> bool:
    """Whether the file holds /channels (files written before it existed do not)."""
    with _open(path) as f:
        return "channels" in f


def _read_channels(f: h5py.File, idx: np.ndarray, path) -> torch.Tensor | None:
    """Channel bits (n, H, W) uint8 of images ``idx``, or None where the file has none."""
    if "channels" not in f:
        return None
    bits = f["channels"][idx]
    if bits.size and bits.max() >= 1 << N_CLASSES:
        raise DataError(f"dataset {path}: channels must hold bits of {N_CLASSES} channels "
                        f"(0..{(1 << N_CLASSES) - 1}), found {int(bits.max())}")
    return torch.from_numpy(bits)


def load_split(path: str | os.PathLike, split: str, channels: bool = False) -> tuple:
    """Images (n, 3, H, W) float32 in [0, 1] and masks (n, H, W) int64 of one split;
    with ``channels`` also the channel bits (n, H, W) uint8, or None where the file
    has no /channels: (images, masks, channels)."""
    with _open(path) as f:
        idx = f[f"split/{split}"][:]
        try:
            images, masks = f["images"][idx], f["masks"][idx]
            bits = _read_channels(f, idx, path) if channels else None
        except (OSError, ValueError) as err:
            raise DataError(f"dataset {path} is corrupt ({err})") from None
    _check_values(images, masks, path)
    out = torch.from_numpy(images), torch.from_numpy(masks.astype(np.int64))
    return out + (bits,) if channels else out


def _check_values(images: np.ndarray, masks: np.ndarray, path) -> None:
    if not np.isfinite(images).all() or (images.size and (images.min() < 0 or images.max() > 1)):
        raise DataError(f"dataset {path}: images must be finite values in [0, 1]")
    if masks.size and masks.max() >= N_CLASSES:
        raise DataError(f"dataset {path}: masks must hold class ids 0..{N_CLASSES - 1}, "
                        f"found {int(masks.max())}")


def head(path: str | os.PathLike, split: str, n: int, channels: bool = False) -> tuple:
    """The first ``n`` images and masks of a split (for figures: never the whole set);
    with ``channels`` also their channel bits or None, as :func:`load_split`."""
    _, images, masks, _, *bits = next(iter_chunks(path, split, n, channels))
    return (images, masks, *bits)


def image_size(path: str | os.PathLike) -> int:
    with _open(path) as f:
        return f["images"].shape[-1]


def iter_chunks(path: str | os.PathLike, split: str, chunk: int, channels: bool = False) -> Iterator[tuple]:
    """Stream one split: (indices, images, masks, tissue names) chunk by chunk; with
    ``channels`` a fifth item, the channel bits (n, H, W) uint8 or None where the
    file has no /channels."""
    with _open(path) as f:
        idx = f[f"split/{split}"][:]
        for s in range(0, len(idx), chunk):
            part = idx[s:s + chunk]
            try:
                images, masks, tissue = f["images"][part], f["masks"][part], f["tissue"][part]
                bits = _read_channels(f, part, path) if channels else None
            except (OSError, ValueError) as err:
                raise DataError(f"dataset {path} is corrupt ({err})") from None
            _check_values(images, masks, path)
            out = part, torch.from_numpy(images), torch.from_numpy(masks.astype(np.int64)), tissue
            yield out + (bits,) if channels else out


# --------------------------------------------------------------------------- the prepare stage
