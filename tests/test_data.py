"""Data: PanNuke import (zip and folder), semantic rule, split, normalisation, HDF5."""
from __future__ import annotations

import json
import zipfile

import h5py
import numpy as np
import pytest
import torch

from mlsys import data, prepare
from mlsys.params import OFFICIAL_SPLITS, DataParams


def fake_fold(n: int = 9, size: int = 8, seed: int = 0):
    """Raw arrays in the exact PanNuke layout, with its awkward cases."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3)).astype(np.float64)
    masks = np.zeros((n, size, size, 6), np.float64)
    masks[..., 5] = 1.0
    masks[0, 1:3, 1:3, 0] = 1000.0          # id > 255 (uint8 cast would wrap to 232)
    masks[0, 1:3, 1:3, 5] = 0
    masks[0, 4, 4, 1] = 256.0               # id 256: uint8 cast would give 0
    masks[0, 4, 4, 5] = 0
    masks[1, 2, 2, 2] = 7.0                 # a pixel set in two class channels
    masks[1, 2, 2, 4] = 9.0
    masks[1, 2, 2, 5] = 0
    masks[1, 5, 5, :] = 0                   # a void pixel: zero in all six channels
    masks[2] = 0                            # a whole void patch
    masks[3, 0, 0, 3] = 3.0                 # dead nucleus
    masks[3, 0, 0, 5] = 0
    types = np.array(["Breast", "Colon", "Lung"] * (n // 3) + ["Kidney"] * (n % 3))
    return images, masks, types


def write_fold(folder, fold, images, masks, types):
    base = folder / f"Fold {fold}"
    (base / "images" / f"fold{fold}").mkdir(parents=True)
    (base / "masks" / f"fold{fold}").mkdir(parents=True)
    np.save(base / "images" / f"fold{fold}" / "images.npy", images)
    np.save(base / "images" / f"fold{fold}" / "types.npy", types)
    np.save(base / "masks" / f"fold{fold}" / "masks.npy", masks)
    return base


def test_semantic_rule_ids_overlap_void():
    _, masks, _ = fake_fold()
    sem = prepare.semantic_masks(masks)
    assert sem.dtype == np.uint8 and sem.shape == masks.shape[:3]
    assert (sem[0, 1:3, 1:3] == 1).all()        # id 1000 in channel 0 -> neoplastic
    assert sem[0, 4, 4] == 2                    # id 256 in channel 1 -> inflammatory
    assert sem[1, 2, 2] == 3                    # channels 2 and 4 set: the lower wins
    assert sem[1, 5, 5] == 0 and (sem[2] == 0).all()  # void -> background
    assert sem[3, 0, 0] == 4


@pytest.mark.parametrize("packing", ["folder", "fold-folder", "zip"])
def test_pannuke_import(tmp_path, packing):
    images, masks, types = fake_fold()
    base = write_fold(tmp_path / "src", 2, images, masks, types)
    path = {"folder": tmp_path / "src", "fold-folder": base}.get(packing)
    if packing == "zip":
        path = tmp_path / "fold_2.zip"
        with zipfile.ZipFile(path, "w") as z:
            for f in base.rglob("*.npy"):
                z.write(f, f.relative_to(tmp_path / "src"))
    out = tmp_path / "clean.h5"
    cfg = DataParams(source="pannuke", pannuke_path=str(path), fold=2, normalise="255")
    sizes = prepare.prepare(cfg, out, progress=False)
    assert sizes == {"train": 6, "valid": 1, "test": 2}
    with h5py.File(out) as f:
        assert f["images"].shape == (9, 3, 8, 8) and f["images"].dtype == np.float32
        np.testing.assert_allclose(f["images"][4], images[4].transpose(2, 0, 1) / 255, rtol=1e-6)
        np.testing.assert_array_equal(f["masks"][:], prepare.semantic_masks(masks))
        assert [t.decode() for t in f["tissue"][:3]] == ["Breast", "Colon", "Lung"]
        np.testing.assert_array_equal(f["channels"][:], prepare.channel_bits(masks))
        assert f.attrs["source"].startswith("pannuke:")
        assert "lowest channel" in f.attrs["overlap_rule"]
        all_idx = np.concatenate([f[f"split/{s}"][:] for s in data.SPLITS])
        assert sorted(all_idx) == list(range(9))


def test_pannuke_errors(tmp_path):
    cfg = DataParams(source="pannuke", pannuke_path=str(tmp_path / "nope"))
    with pytest.raises(data.DataError, match="does not exist"):
        prepare.prepare(cfg, tmp_path / "o.h5", progress=False)
    (tmp_path / "empty").mkdir()
    cfg.pannuke_path = str(tmp_path / "empty")
    with pytest.raises(data.DataError, match="expected one images.npy"):
        prepare.prepare(cfg, tmp_path / "o.h5", progress=False)
    images, masks, types = fake_fold()
    base = write_fold(tmp_path / "bad", 2, images, masks[:5], types)
    cfg.pannuke_path = str(base)
    with pytest.raises(data.DataError, match="masks.npy has shape"):
        prepare.prepare(cfg, tmp_path / "o.h5", progress=False)
    images[3, 0, 0, 0] = np.nan
    base = write_fold(tmp_path / "nan", 2, images, masks, types)
    cfg.pannuke_path = str(base)
    with pytest.raises(data.DataError, match="NaN"):
        prepare.prepare(cfg, tmp_path / "o.h5", progress=False)
    assert not (tmp_path / "o.h5").exists() and not list(tmp_path.glob(".o.h5*"))


def test_channel_bits_mapping():
    """Bit c = our class id c: background (ours 0) is raw channel 5, class c is raw c - 1."""
    _, masks, _ = fake_fold()
    bits = prepare.channel_bits(masks)
    assert bits.dtype == np.uint8 and bits.shape == masks.shape[:3]
    assert (bits[0, 1:3, 1:3] == 0b10).all()           # id 1000 in raw 0 -> neoplastic (bit 1), no wrap
    assert bits[0, 4, 4] == 0b100                       # id 256 in raw 1 -> inflammatory (bit 2)
    assert bits[1, 2, 2] == (1 << 3) | (1 << 5)         # overlap: raw 2 and 4 -> bits 3 and 5
    assert bits[1, 5, 5] == 0 and (bits[2] == 0).all()  # void: no bit (the semantic label says 0)
    assert bits[3, 0, 0] == 1 << 4 and bits[3, 1, 1] == 1  # dead (raw 3) -> bit 4; background -> bit 0
    chans = data.unpack_channels(torch.from_numpy(bits))
    assert chans.shape == (9, 6, 8, 8)
    for c, k in enumerate([5, 0, 1, 2, 3, 4]):
        np.testing.assert_array_equal(chans[:, c].numpy(), masks[..., k] != 0)


def test_readers_channels_keyword(tmp_path):
    images, masks, types = fake_fold()
    base = write_fold(tmp_path / "src", 2, images, masks, types)
    out = tmp_path / "clean.h5"
    prepare.prepare(DataParams(source="pannuke", pannuke_path=str(base), fold=2), out, progress=False)
    idx = data.split_of(out, "train")
    assert len(data.load_split(out, "train")) == 2 and len(data.head(out, "train", 3)) == 2
    assert len(next(data.iter_chunks(out, "train", 4))) == 4      # the old callers' shapes
    x, y, bits = data.load_split(out, "train", channels=True)
    np.testing.assert_array_equal(bits.numpy(), prepare.channel_bits(masks)[idx])
    _, _, hbits = data.head(out, "train", 3, channels=True)
    np.testing.assert_array_equal(hbits.numpy(), prepare.channel_bits(masks)[idx[:3]])
    chunks = [c[4] for c in data.iter_chunks(out, "train", 4, channels=True)]
    np.testing.assert_array_equal(np.concatenate(chunks), bits.numpy())
    assert data.has_channels(out)
    with h5py.File(out, "a") as f:
        f["channels"][idx[0], 0, 0] = 64                          # a seventh channel
    with pytest.raises(data.DataError, match="bits of 6 channels"):
        data.load_split(out, "train", channels=True)
    with h5py.File(out, "a") as f:                                # an older file: no /channels
        del f["channels"]
    assert not data.has_channels(out) and data.load_split(out, "train", channels=True)[2] is None
    assert data.head(out, "train", 2, channels=True)[2] is None
    with h5py.File(out, "a") as f:
        f["channels"] = np.zeros((9, 4, 4), np.uint8)
    with pytest.raises(data.DataError, match="channels are uint8"):
        data.load_split(out, "train")


def test_split_sizes_match_paper():
    s = prepare.split_indices(2523, [6, 1, 2], 42)
    assert [len(s[k]) for k in data.SPLITS] == [1682, 280, 561]
    assert len(np.unique(np.concatenate(list(s.values())))) == 2523
    again = prepare.split_indices(2523, [6, 1, 2], 42)
    assert all((s[k] == again[k]).all() for k in data.SPLITS)


def test_normalisation_modes():
    raw = np.stack([np.full((4, 4, 3), 50.0), np.arange(48, dtype=float).reshape(4, 4, 3) + 10])
    mm = prepare.normalise_images(raw, "minmax")
    assert mm.shape == (2, 3, 4, 4)
    assert (mm[0] == 0).all()                     # constant image
    assert mm[1].min() == 0 and mm[1].max() == 1
    np.testing.assert_allclose(prepare.normalise_images(raw, "255"), raw.transpose(0, 3, 1, 2) / 255, rtol=1e-6)


def test_synthetic_prepare_and_load(tmp_path):
    out = tmp_path / "clean.h5"
    cfg = DataParams(n_images=18, image_size=16)
    sizes = prepare.prepare(cfg, out, progress=False)
    assert sum(sizes.values()) == 18
    x, y = data.load_split(out, "train")
    assert x.shape == (sizes["train"], 3, 16, 16) and x.dtype.is_floating_point
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and y.max() <= 5
    chunks = list(data.iter_chunks(out, "train", 5))
    assert sum(len(c[0]) for c in chunks) == sizes["train"]
    from mlsys.synthetic import generate                   # the synthetic path keeps the bits too
    _, raw, _ = generate(18, 16, cfg.synthetic_seed, progress=False)
    bits = data.load_split(out, "train", channels=True)[2].numpy()
    np.testing.assert_array_equal(bits, prepare.channel_bits(raw)[data.split_of(out, "train")])


def test_synthetic_prepare_streams_the_generator(tmp_path):
    """prepare writes the generator's patches chunk by chunk: the file holds the bytes of
    the in-memory generate(), and the traced memory peak does not grow with the count."""
    import tracemalloc

    from mlsys.synthetic import generate

    size, peaks = 16, {}
    for n in (128, 512):
        cfg = DataParams(n_images=n, image_size=size, synthetic_seed=3)
        tracemalloc.start()
        try:
            prepare.prepare(cfg, tmp_path / f"clean{n}.h5", progress=False)
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    full = 512 * size * size * (3 + 6) * 8  # generate()'s float64 images and masks: 9.4 MB
    assert peaks[512] < 1.25 * peaks[128] and peaks[512] < full / 2, (peaks, full)
    images, masks, types = generate(128, size, 3, progress=False)
    with h5py.File(tmp_path / "clean128.h5") as f:
        assert np.array_equal(f["images"][:], prepare.normalise_images(images, "minmax"))
        assert np.array_equal(f["masks"][:], prepare.semantic_masks(masks))
        assert f["tissue"][:].astype(str).tolist() == types.tolist()


def test_corrupt_and_incomplete_h5(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(data.DataError, match="not a readable HDF5"):
        data.load_split(bad, "train")
    part = tmp_path / "part.h5"
    with h5py.File(part, "w") as f:
        f["images"] = np.zeros((2, 3, 8, 8), np.float32)
    with pytest.raises(data.DataError, match="has no 'masks'"):
        data.load_split(part, "train")


# --------------------------------------------------------------------------- PanNuke's two protocols
FOLD_SIZES = {1: 4, 2: 5, 3: 6}  # images per fixture fold, all different, so a wrong fold shows


def zip_fold(base, path):
    """Pack an unpacked ``Fold N`` folder as PanNuke ships it: ``Fold N/...`` inside the zip."""
    with zipfile.ZipFile(path, "w") as z:
        for f in base.rglob("*.npy"):
            z.write(f, f.relative_to(base.parent))
    return path


def three_folds(root, size: int = 8, sizes: dict[int, int] = FOLD_SIZES):
    """PanNuke's three folds, packed three ways: fold 1 a zip, fold 2 its unpacked ``Fold 2``
    folder, fold 3 a folder above its ``Fold 3``. Returns ({fold: path}, {fold: raw arrays})."""
    raw = {k: fake_fold(n, size, seed=k) for k, n in sizes.items()}
    bases = {k: write_fold(root / f"src{k}", k, *raw[k]) for k in raw}
    return {1: zip_fold(bases[1], root / "fold_1.zip"), 2: bases[2], 3: root / "src3"}, raw


def official(paths, split: int, **kw) -> DataParams:
    return DataParams(source="pannuke", protocol="official", pannuke_folds=[str(p) for p in paths],
                      official_split=split, normalise="255", **kw)


@pytest.mark.parametrize("split", sorted(OFFICIAL_SPLITS))
def test_official_split_is_whole_folds(tmp_path, split):
    """Train, valid and test hold exactly the images of the folds the split names (CellViT's
    Fold-1..3: 1/2/3, 2/1/3, 3/2/1), in the fold's order; the provenance says so."""
    paths, raw = three_folds(tmp_path)
    out = tmp_path / "clean.h5"
    sizes = prepare.prepare(official(paths.values(), split), out, progress=False)
    folds = dict(zip(data.SPLITS, OFFICIAL_SPLITS[split]))
    assert folds == {1: {"train": 1, "valid": 2, "test": 3}, 2: {"train": 2, "valid": 1, "test": 3},
                     3: {"train": 3, "valid": 2, "test": 1}}[split]
    assert sizes == {name: FOLD_SIZES[f] for name, f in folds.items()}
    with h5py.File(out) as f:
        assert f["images"].shape == (15, 3, 8, 8)                 # the three folds, one after the other
        for name, k in folds.items():
            idx = f[f"split/{name}"][:]
            images, masks, types = raw[k]
            np.testing.assert_array_equal(f["images"][idx], prepare.normalise_images(images, "255"))
            np.testing.assert_array_equal(f["masks"][idx], prepare.semantic_masks(masks))
            np.testing.assert_array_equal(f["channels"][idx], prepare.channel_bits(masks))
            assert f["tissue"].asstr()[idx].tolist() == types.tolist()
    attrs = data.read_attrs(out)
    assert attrs["protocol"] == "official" and attrs["official_split"] == split
    assert json.loads(attrs["split_folds"]) == folds and json.loads(attrs["fold_sizes"]) == [4, 5, 6]
    assert json.loads(attrs["fold_paths"]) == ["fold_1.zip:Fold 1/images/fold1/images.npy",
                                               "Fold 2:images/fold2/images.npy", "src3:Fold 3/images/fold3/images.npy"]
    assert "split_seed" not in attrs and "split_ratio" not in attrs   # no random split was cut
    a, b, c = OFFICIAL_SPLITS[split]
    assert data.describe_split(attrs) == f"PanNuke official split {split} (train fold {a}, valid fold {b}, test fold {c})"


def test_official_from_one_folder_holding_all_three(tmp_path):
    raw = {k: fake_fold(n, 8, seed=k) for k, n in FOLD_SIZES.items()}
    for k in raw:
        write_fold(tmp_path / "pannuke", k, *raw[k])
    out = tmp_path / "clean.h5"
    assert prepare.prepare(official([tmp_path / "pannuke"], 3), out, progress=False) == \
        {"train": 6, "valid": 5, "test": 4}
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["images"][f["split/test"][:]], prepare.normalise_images(raw[1][0], "255"))


def test_pooled_split_is_unchanged(tmp_path):
    """The pooled protocol (the default, the paper's) cuts the split it always did: these
    indices are what the code before the official protocol wrote for this fold."""
    images, masks, types = fake_fold()
    base = write_fold(tmp_path / "src", 2, images, masks, types)
    out = tmp_path / "clean.h5"
    prepare.prepare(DataParams(source="pannuke", pannuke_path=str(base), fold=2), out, progress=False)
    assert {s: data.split_of(out, s).tolist() for s in data.SPLITS} == \
        {"train": [0, 1, 2, 5, 7, 8], "valid": [4], "test": [3, 6]}
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["images"][:], prepare.normalise_images(images, "minmax"))
    attrs = data.read_attrs(out)
    assert (attrs["protocol"], attrs["fold"], attrs["split_seed"], attrs["split_ratio"]) == ("pooled", 2, 42, "[6, 1, 2]")
    assert data.describe_split(attrs) == "PanNuke fold 2, pooled 6:1:2 at random (seed 42)"
    old = {k: v for k, v in attrs.items() if k not in ("protocol", "fold")}   # a file from before the protocols
    assert data.describe_split(old) == "PanNuke fold 2, pooled 6:1:2 at random (seed 42)"
    synth = tmp_path / "synth.h5"
    prepare.prepare(DataParams(n_images=9, image_size=8), synth, progress=False)
    assert data.describe_split(data.read_attrs(synth)) == "synthetic(seed=0), pooled 6:1:2 at random (seed 42)"


def test_official_bad_input_is_one_line_and_leaves_nothing(tmp_path):
    from mlsys.params import Params, ParamsError, _build

    paths, _ = three_folds(tmp_path)
    p1, p2, p3 = paths[1], paths[2], paths[3]
    small = tmp_path / "small"
    write_fold(small, 3, *fake_fold(6, 16, seed=3))
    only_two = tmp_path / "two"
    for k in (1, 2):
        write_fold(only_two, k, *fake_fold(FOLD_SIZES[k], 8, seed=k))
    out = tmp_path / "o.h5"
    cases = [(official([p1, tmp_path / "nowhere.zip", p3], 1), "nowhere.zip does not exist"),
             (official([], 1), "data.pannuke_folds is empty"),
             (official([p1, p2], 1), "has 2 paths; the official protocol needs PanNuke's three folds"),
             (official([only_two], 1), "expected one images.npy of fold 3"),
             (official([p2, p2, p3], 1), "is not fold 1's images.npy"),       # one fold cannot stand in for another
             (official([p1, p2, small], 2), r"different image sizes: fold 1 8x8 \(.*\), fold 2 8x8 \(.*\), fold 3 16x16")]
    for cfg, message in cases:
        with pytest.raises(data.DataError, match=message) as err:
            prepare.prepare(cfg, out, progress=False)
        assert "\n" not in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(".o.h5*"))
    for raw, message in [({"protocol": "official", "source": "pannuke", "official_split": 4},
                          "data.official_split = 4 is invalid; expected 1, 2 or 3 (1: train fold 1, valid 2, test 3; "
                          "2: train fold 2, valid 1, test 3; 3: train fold 3, valid 2, test 1)"),
                         ({"protocol": "official"}, "data.protocol = 'official' is invalid; expected \"pooled\" with "
                                                    "data.source synthetic"),
                         ({"protocol": "random"}, "data.protocol = 'random' is invalid"),
                         ({"source": "pannuke", "protocol": "official", "pannuke_folds": ["a", "b"]},
                          "data.pannuke_folds = ['a', 'b'] is invalid; expected PanNuke's three folds")]:
        with pytest.raises(ParamsError) as err:
            _build(Params, {"data": raw}, "").validate()
        assert str(err.value).startswith(f"params: {message}") and "\n" not in str(err.value)
