"""Datasets: PanNuke import, the synthetic default, the HDF5 format and loading.

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

Every dataset of the pipeline is one HDF5 file (this module is the one place that
writes them):
  /images  (N, 3, H, W) float32 in [0, 1], chunked one image per chunk
  /masks   (N, H, W) uint8 class ids 0..5
  /channels (N, H, W) uint8 channel bits 0..63 (above), chunked like /masks;
           absent from files written before it existed (readers then give None)
  /tissue  (N,) str
  /split/{train,valid,test}  int64 sorted indices
  attrs: provenance (source, seeds, normalisation, producing model, attack settings),
         class_names, overlap_rule, channels_rule (where /channels exists)
The method sets (mlsys.augment) copy /masks and /channels of the clean training split.
Files are written beside their destination and renamed on success, so a killed
stage never leaves a file that looks complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import zipfile
import zlib
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch

from .params import CLASS_NAMES, DataParams, InputError
from .progress import bar as progress_bar

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


def unpack_channels(bits: torch.Tensor, n_classes: int = N_CLASSES) -> torch.Tensor:
    """bits: (N, H, W) integer channel bits -> (N, n_classes, H, W) bool, channel c = bit c."""
    shifts = torch.arange(n_classes, device=bits.device).view(1, -1, 1, 1)
    return ((bits.long().unsqueeze(1) >> shifts) & 1) == 1


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


# --------------------------------------------------------------------------- PanNuke import
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


def file_md5(path: str | os.PathLike) -> str:
    """md5 of a file's bytes (what DVC records for a file output)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- outputs
def write_json(path: str | os.PathLike, obj) -> None:
    """A metrics file (DVC metrics, read by `dvc metrics/exp show`), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """A plot file (DVC plots) of ``rows`` with the keys of the first row, written atomically."""
    keys = list(rows[0])
    with atomic_path(path) as tmp:
        tmp.write_text(",".join(keys) + "\n" + "".join(
            ",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + "\n" for r in rows))


def require(path: str | os.PathLike, made_by: str) -> None:
    """An input of a stage must exist: else one line naming it and the stage that makes it."""
    if not Path(path).exists():
        raise DataError(f"{path} does not exist; it is made by the {made_by} stage "
                        f"(run `dvc repro {made_by}` or the whole `dvc repro`)")


# --------------------------------------------------------------------------- HDF5
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _clear_stale(path: Path) -> None:
    """Remove temporaries of ``path`` left by killed processes (``.name.tmp<pid>``)."""
    for tmp in path.parent.glob(f".{path.name}.tmp*"):
        pid = tmp.name[len(path.name) + 5:].removesuffix("old")
        if pid.isdigit() and not _pid_alive(int(pid)):
            _remove(tmp)


def _make_parents(path: Path) -> list[Path]:
    """Create the missing parent folders of ``path``; returns them, deepest first."""
    made = []
    for parent in path.parents:
        if parent.exists():
            break
        made.append(parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    return made


def _remove_empty(folders: list[Path]) -> None:
    """Remove folders made for an output that was not written, while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (another output landed there) or gone
            return


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success,
    delete it on failure, so a killed or failed stage leaves no plausible output.
    Temporaries of killed earlier runs (SIGKILL runs no cleanup) are removed first."""
    path = Path(path)
    made = _make_parents(path)
    _clear_stale(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
        if not path.exists():
            _remove_empty(made)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Like :func:`atomic_path` for an output folder (a DVC out dir written file by
    file): yields an empty temporary folder beside ``path`` that replaces ``path``
    only once everything in it is written."""
    path = Path(path)
    made = _make_parents(path)
    _clear_stale(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():  # a folder cannot be renamed over a non-empty one: move it aside
            old = path.with_name(f".{path.name}.tmp{os.getpid()}old")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            _remove(tmp)
        if not path.exists():
            _remove_empty(made)


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


def import_raw(chunks: Iterator[tuple[np.ndarray, np.ndarray]], types: np.ndarray,
               out: str | os.PathLike, cfg: DataParams, source: str, image_size: int, where: str,
               progress: bool = True) -> dict[str, int]:
    """Convert raw PanNuke-layout (images, masks) chunks to the HDF5 dataset at ``out``,
    one chunk in memory at a time."""
    n = len(types)
    attrs = {"source": source, "normalise": cfg.normalise, "split_seed": cfg.split_seed,
             "split_ratio": cfg.split, "n_images": n, "kind": "clean"}
    counts = np.zeros(N_CLASSES, np.int64)
    # the split is cut after every value is checked, so a damaged file is reported as such
    with create_dataset(out, n, image_size, attrs, None) as w, \
            progress_bar(n, "prepare", "img", progress) as bar:
        w.write(0, tissue=np.asarray(types).astype(str).astype(object))
        start = 0
        for images, masks in chunks:
            check_raw_chunk(images, masks, f"{where} images {start}..{start + len(images) - 1}")
            sem = semantic_masks(masks)
            counts += np.bincount(sem.ravel(), minlength=N_CLASSES)
            w.write(start, images=normalise_images(images, cfg.normalise), masks=sem,
                    channels=channel_bits(masks))
            start += len(images)
            bar.update(len(images))
        if start != n:
            raise DataError(f"{where}: {start} images and masks but {n} tissue types")
        splits = split_indices(n, cfg.split, cfg.split_seed)
        w.write_splits(splits)
        w.f.attrs["class_pixel_counts"] = json.dumps(counts.tolist())
    return {name: len(idx) for name, idx in splits.items()}


def prepare(cfg: DataParams, out: str | os.PathLike, progress: bool = True) -> dict[str, int]:
    """Build the clean dataset (synthetic default or a PanNuke fold) at ``out``."""
    if cfg.source == "synthetic":
        from .synthetic import generate_chunks, tissue_types

        # streamed: one chunk of 64 patches in memory, whatever n_images
        chunks = generate_chunks(cfg.n_images, cfg.image_size, cfg.synthetic_seed, 64, progress=False)
        return import_raw(((images, masks) for images, masks, _ in chunks),
                          tissue_types(cfg.n_images, cfg.synthetic_seed),
                          out, cfg, f"synthetic(seed={cfg.synthetic_seed})", cfg.image_size,
                          "synthetic", progress)
    if not cfg.pannuke_path:
        raise DataError("params: data.pannuke_path is empty; set it to your PanNuke fold zip or folder")
    src = PanNukeSource(cfg.pannuke_path, cfg.fold)
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
    size = shapes["images"][1]
    try:
        name = {key: f"{src.path}:{member}" for key, member in src.members.items()}
        with src.open("types") as f:
            types = next(_npy_chunks(f, name["types"], max(n, 1)))
        with src.open("images") as fi, src.open("masks") as fm:
            return import_raw(zip(_npy_chunks(fi, name["images"], 32), _npy_chunks(fm, name["masks"], 32)),
                              types, out, cfg, f"pannuke:{src.path.name}:fold{cfg.fold}", size,
                              str(src.path), progress)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:  # a damaged download
        raise DataError(f"{src.path}: corrupt zip file ({err})") from None


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
        print(f"prepare: {out} ({sizes['train']}/{sizes['valid']}/{sizes['test']} train/valid/test, "
              f"source {attrs['source']})")
