"""Built-in default dataset: synthetic H&E-like histology patches in raw PanNuke layout.

PanNuke (Gamper et al., 2019/2020) ships each fold as three arrays, and
:func:`generate` returns the same three, so the importer in ``mlsys.data`` treats
real and synthetic data identically:

  images (N, S, S, 3) float64 holding whole values 0..255 (RGB)
  masks  (N, S, S, 6) float64: channels 0..4 = neoplastic, inflammatory,
         connective, dead, epithelial, each holding INSTANCE ids (0 = none; ids are
         non-contiguous, often > 255, unique within a patch); channel 5 is 1.0 on
         background (no nucleus), else 0
  types  (N,) str tissue names ("Breast", "Colon", ...)

What is mimicked:
  * Appearance: pixels are made with the Beer-Lambert stain model that H&E colour
    deconvolution assumes, RGB = I0 * exp(-(c_H * h + c_E * e + c_D * d)), with
    haematoxylin (purple-blue), eosin (pink) and a little brown optical-density
    vector, jittered per patch (stain variation). Stroma is eosin with smooth
    low-frequency texture, wavy collagen fibres, occasional white spaces and pixel
    noise; nuclei are haematoxylin-rich blobs with soft edges.
  * Five nucleus classes that differ in size, shape, colour and texture:
    neoplastic large irregular dark purple with speckled chromatin; inflammatory
    small round very dark and dense; connective thin elongated spindles aligned with
    the collagen; dead tiny, fragmented, ring-like, pale pinkish-brown (rare: a few
    percent of patches); epithelial medium oval, lighter purple, pale interior with
    a darker rim.
  * Label statistics: ~80-85 % background pixels on average (the nucleus area of a
    patch is drawn, then nuclei are added until it is reached), extreme class
    imbalance, touching neighbours (nuclei are deliberately placed next to earlier
    ones, and the earlier one keeps the shared pixels), a per-patch class mix biased
    by tissue, "void" pixels that are 0 in all six channels (a one-pixel ring at some
    nucleus borders, and about 1 % of patches whose whole mask is zero), and a few
    patches where a nucleus also claims a neighbour's border pixels in its own
    channel, so those pixels are set in two class channels (overlap).

Sizes are fractions of the patch side with minimums in pixels, so the same
generator gives PanNuke-like 256 x 256 patches and still-visible nuclei (2-5 px
radius) at 32 x 32. Patch i comes from ``np.random.default_rng([seed, i])``: it is
the same whatever ``n`` is, and equal seeds give bit-identical arrays.
"""
from __future__ import annotations

import bisect
import math
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

# Class ids = PanNuke channel index + 1 (0 is background in semantic maps).
NEO, INF, CON, DEAD, EPI = 1, 2, 3, 4, 5
CLASS_NAMES = ("neoplastic", "inflammatory", "connective", "dead", "epithelial")

TISSUES = ("Breast", "Colon", "Lung", "Kidney", "Prostate", "Skin", "Stomach", "Liver")
# PanNuke is dominated by breast and colon patches.
_TISSUE_P = np.array([0.30, 0.18, 0.10, 0.09, 0.09, 0.09, 0.08, 0.07])
_TISSUE_CUM = np.cumsum(_TISSUE_P)
# Dirichlet prior of the per-patch mix of (neoplastic, inflammatory, connective,
# epithelial) per tissue; the patch mix is drawn around it, so patches vary.
_MIX = np.array([
    [0.50, 0.15, 0.25, 0.10],   # Breast: tumour nests in stroma
    [0.40, 0.20, 0.15, 0.25],   # Colon: glands, lamina propria lymphocytes
    [0.35, 0.35, 0.20, 0.10],   # Lung: inflamed
    [0.25, 0.15, 0.15, 0.45],   # Kidney: tubular epithelium
    [0.30, 0.10, 0.20, 0.40],   # Prostate: glands
    [0.30, 0.30, 0.30, 0.10],   # Skin
    [0.35, 0.25, 0.15, 0.25],   # Stomach
    [0.45, 0.20, 0.15, 0.20],   # Liver
])
_MIX_CLASSES = np.array([NEO, INF, CON, EPI])
_DEAD_P = np.array([0.04, 0.06, 0.06, 0.03, 0.03, 0.04, 0.05, 0.05])  # P(patch has dead nuclei)
_WHITE_P = np.array([0.35, 0.30, 0.45, 0.20, 0.30, 0.15, 0.25, 0.10])  # P(patch has white spaces)

# Optical density per unit stain (natural log), normalised reference vectors
# (Macenko-style H and E; Ruifrok's DAB for the brown tint of dead nuclei).
_H = np.array([0.5626, 0.7201, 0.4062])
_E = np.array([0.2159, 0.8012, 0.5581])
_D = np.array([0.2680, 0.5700, 0.7760])

# Probability that a new nucleus of each class is placed touching an earlier one
# (tumour nests and epithelium are crowded; spindles and lymphocytes less so).
_P_TOUCH = {NEO: 0.55, INF: 0.30, CON: 0.20, DEAD: 0.0, EPI: 0.55}

_P_EMPTY_MASK = 0.01     # whole mask 0 in all channels (PanNuke has a few such patches)
_P_OVERLAP = 0.04        # patch gets a few pixels set in two class channels
_P_RING = 0.10           # nucleus gets a one-pixel void ring at its border


def generate(n: int, size: int, seed: int, progress: bool = True
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate ``n`` synthetic patches of ``size`` x ``size`` pixels in raw PanNuke layout.

    Returns (images, masks, types):
      images: (n, size, size, 3) float64 holding whole values 0..255 (RGB)
      masks:  (n, size, size, 6) float64; channels 0..4 = neoplastic, inflammatory,
              connective, dead, epithelial, each holding instance ids (0 = none; ids
              non-contiguous, some > 255, unique within a patch); channel 5 = 1.0 on
              background pixels, else 0; "void" pixels are 0 in all six channels
      types:  (n,) numpy array of str tissue names
    Patch i depends only on (seed, i, size). ``progress`` shows a tqdm bar.
    Holds all n patches in memory; :func:`generate_chunks` streams the same bytes.
    """
    n, size, seed = _check_args(n, size, seed)
    images = np.empty((n, size, size, 3), dtype=np.float64)
    masks = np.zeros((n, size, size, 6), dtype=np.float64)
    types = []
    grid = _Grid(size)  # coordinates and resampling matrices shared by all patches
    for i in tqdm(range(n), desc="synthetic", disable=not progress, unit="patch"):
        rng = np.random.default_rng([seed, i])  # per-patch stream: patch i independent of n
        types.append(_patch(rng, grid, images[i], masks[i]))
    return images, masks, np.array(types)


def generate_chunks(n: int, size: int, seed: int, chunk: int = 64, progress: bool = True
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The patches of :func:`generate` (same bytes for the same arguments), ``chunk`` at a
    time: yields (images (k, S, S, 3), masks (k, S, S, 6), types (k,)) for patches
    [j * chunk, j * chunk + k), k = chunk except in the last. Memory is one chunk, whatever n."""
    n, size, seed = _check_args(n, size, seed)
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    grid = _Grid(size)
    with tqdm(total=n, desc="synthetic", disable=not progress, unit="patch") as bar:
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            images = np.empty((k, size, size, 3), dtype=np.float64)
            masks = np.zeros((k, size, size, 6), dtype=np.float64)
            types = [_patch(np.random.default_rng([seed, start + j]), grid, images[j], masks[j])
                     for j in range(k)]
            bar.update(k)
            yield images, masks, np.array(types)


def tissue_types(n: int, seed: int) -> np.ndarray:
    """(n,) str tissue names of the patches of :func:`generate`, without drawing the patches
    (the tissue is each patch stream's first draw; the size does not enter)."""
    n, _, seed = _check_args(n, 8, seed)
    return np.array([TISSUES[_tissue(np.random.default_rng([seed, i]))] for i in range(n)])


# --------------------------------------------------------------------------- internals
def _check_args(n, size, seed) -> tuple[int, int, int]:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(n), int(size), int(seed)


def _tissue(rng: np.random.Generator) -> int:
    """A patch's tissue index: the first draw of its stream."""
    return min(int(np.searchsorted(_TISSUE_CUM, rng.random(), side="right")), len(TISSUES) - 1)


class _Grid:
    """Per-size helpers shared by all patches: pixel-centre coordinates (fractions of
    the side) and bilinear resampling indices for smooth noise."""

    def __init__(self, size: int):
        self.size = size
        self.t = (np.arange(size, dtype=np.float64) + 0.5) / size
        self._up: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def upsample(self, cells: int) -> tuple[np.ndarray, np.ndarray]:
        """For a (cells + 1)-point grid: left index (S,) and right weight (S,) per pixel."""
        if cells not in self._up:
            pos = self.t * cells
            i0 = np.minimum(np.floor(pos).astype(np.int64), cells - 1)
            self._up[cells] = i0, pos - i0
        return self._up[cells]


def _patch(rng: np.random.Generator, g: _Grid, image: np.ndarray, mask: np.ndarray) -> str:
    """Fill one patch in place: image (S, S, 3) and mask (S, S, 6). Returns the tissue name."""
    size = g.size
    tissue = _tissue(rng)
    fibre_angle = rng.uniform(0.0, np.pi)
    c_h, c_e, c_d = _stroma(rng, g, fibre_angle, rng.random() < _WHITE_P[tissue])

    inst = np.zeros((size, size), dtype=np.int32)   # local index 1..k of the owning nucleus
    void = np.zeros((size, size), dtype=bool)       # border-ring pixels left unlabelled
    # Chromatin texture shared by all nuclei of the patch: blurred noise with clumps
    # ~4 px wide (about a tenth of a neoplastic nucleus at 256), unit variance.
    chrom = _smooth_noise(rng, g, max(8, size // 4))
    chrom /= chrom.std() + 1e-9
    classes = _place_nuclei(rng, size, tissue, fibre_angle, inst, void, chrom, c_h, c_e, c_d)

    # Beer-Lambert with per-patch stain jitter (stain variation between labs/slides)
    # and staining strength folded into the optical-density vectors.
    strength = rng.uniform(0.85, 1.15)
    h = _jitter(rng, _H, 0.05) * strength
    e = _jitter(rng, _E, 0.07) * strength
    i0 = rng.uniform(232.0, 250.0)                   # illumination / white level
    log_rgb = math.log(i0) - (c_h[..., None] * h + c_e[..., None] * e + c_d[..., None] * (_D * strength))
    rgb = np.exp(log_rgb, out=log_rgb)
    noise = rng.standard_normal(rgb.shape, dtype=np.float32)  # sensor noise (float32: faster)
    rgb += noise * np.float32(rng.uniform(2.0, 4.5))
    np.rint(rgb, out=rgb)
    np.minimum(np.maximum(rgb, 0.0, out=rgb), 255.0, out=image)

    # Instance ids: non-contiguous, start anywhere up to a few hundred (PanNuke ids
    # are arbitrary and often exceed 255), unique within the patch.
    k = len(classes)
    ids = np.zeros(k + 1, dtype=np.int64)
    if k:
        ids[1:] = rng.integers(1, 400) + np.cumsum(rng.integers(1, 30, k))
    cls = np.zeros(k + 1, dtype=np.int64)
    cls[1:] = classes
    flat = mask.reshape(-1, 6)                       # view of the zeroed output
    px = np.flatnonzero(inst)
    owner = inst.ravel()[px]
    flat[px, cls[owner] - 1] = ids[owner]            # class channel <- instance id
    mask[..., 5] = (inst == 0) & ~void

    if k and rng.random() < _P_OVERLAP:
        _add_overlap(rng, inst, cls, ids, mask)
    if rng.random() < _P_EMPTY_MASK:
        mask[...] = 0.0                              # unannotated patch: all void
    return TISSUES[tissue]


def _jitter(rng: np.random.Generator, v: np.ndarray, s: float) -> np.ndarray:
    """Stain vector ``v`` with a small random change of hue, renormalised."""
    w = np.abs(v + rng.normal(0.0, s, 3))
    return w / np.linalg.norm(w)


def _waves(rng: np.random.Generator, g: _Grid, k: int, lo: float, hi: float) -> np.ndarray:
    """Sum of ``k`` random plane waves with lo..hi cycles per patch, scaled to about [-1, 1].

    sin(u(x) + v(y)) = sin u cos v + cos u sin v, so the (S, S) sum is a rank-2k
    product of per-row and per-column terms. einsum rather than BLAS matmul: no
    thread pool (OpenBLAS threads are very slow on a busy 2-core machine) and the
    same bits whatever the thread settings."""
    f = 2 * np.pi * rng.uniform(lo, hi, k)
    ang = rng.uniform(0.0, 2 * np.pi, k)
    amp = rng.uniform(0.5, 1.0, k) / np.sqrt(k)
    ph = rng.uniform(0.0, 2 * np.pi, k)
    u = np.outer(g.t, f * np.cos(ang)) + ph          # (S, k), along x
    v = np.outer(g.t, f * np.sin(ang))               # (S, k), along y
    rows = np.concatenate([np.cos(v) * amp, np.sin(v) * amp], axis=1)
    cols = np.concatenate([np.sin(u), np.cos(u)], axis=1)
    return np.einsum("ik,jk->ij", rows, cols)


def _smooth_noise(rng: np.random.Generator, g: _Grid, cells: int) -> np.ndarray:
    """Blurred noise (S, S): a (cells + 1)^2 grid of normals bilinearly upsampled, so
    features are ~ size / cells pixels wide (gathers, no BLAS; see _waves)."""
    i0, w = g.upsample(cells)
    grid = rng.standard_normal((cells + 1, cells + 1))
    rows = grid[i0] * (1.0 - w)[:, None] + grid[i0 + 1] * w[:, None]      # (S, cells + 1)
    return rows[:, i0] * (1.0 - w) + rows[:, i0 + 1] * w


def _stroma(rng: np.random.Generator, g: _Grid, fibre_angle: float, white: bool
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stain concentration maps (S, S) of the stroma: haematoxylin, eosin, brown."""
    low = _waves(rng, g, 4, 0.3, 2.5)                  # smooth density changes
    mid = _smooth_noise(rng, g, 6) + 0.6 * _smooth_noise(rng, g, 16)  # blotchy grain
    # Collagen: wavy strands across fibre_angle, bent by a smooth field and fading
    # in and out, so they do not look like regular stripes.
    ca, sa = np.cos(fibre_angle), np.sin(fibre_angle)
    across = g.t[:, None] * ca - g.t[None, :] * sa
    strands = np.sin(2 * np.pi * rng.uniform(5.0, 11.0) * across + 2.5 * _waves(rng, g, 3, 0.5, 2.0))
    strands = np.maximum(strands, 0.0) ** 2 * np.clip(0.6 + 0.5 * _smooth_noise(rng, g, 4), 0.0, 1.0)
    e0 = rng.uniform(0.45, 0.75)
    c_e = e0 * (0.92 + 0.18 * low + 0.06 * mid + 0.3 * strands)
    c_h = rng.uniform(0.04, 0.10) * (1.0 + 0.4 * _waves(rng, g, 2, 0.5, 3.0) + 0.2 * mid)
    if white:
        # White spaces (lumen, fat, tearing): where a smooth field is high the
        # stain fades to almost nothing, with a soft edge.
        field = _waves(rng, g, 3, 0.4, 1.6)
        fade = np.clip((field - rng.uniform(0.3, 0.9)) / 0.25, 0.0, 1.0)
        c_e *= 1.0 - 0.92 * fade
        c_h *= 1.0 - 0.8 * fade
    c_e += rng.normal(0.0, 0.03, c_e.shape)            # fine grain
    np.maximum(c_e, 0.0, out=c_e)
    np.maximum(c_h, 0.0, out=c_h)
    return c_h, c_e, np.zeros_like(c_e)


def _shape(rng: np.random.Generator, c: int, size: int, fibre_angle: float) -> tuple:
    """Random geometry of a nucleus of class ``c``: (a, b, angle, harmonics).

    a, b are semi-axes in pixels: fractions of ``size`` (PanNuke-like at 256) with
    pixel minimums so that a 32-px patch still shows 2-5 px radii. harmonics are
    (k, amplitude, phase) terms that make the outline irregular."""
    u = rng.random(6)                                # one draw, mapped per class
    if c == NEO:        # large, irregular, mildly elongated
        r = max(3.0, 0.046 * size) * (0.85 + 0.45 * u[0])
        q = 1.0 + 0.45 * u[1]
        harm = ((2, 0.04 + 0.06 * u[2]), (3, 0.04 + 0.08 * u[3]), (5, 0.06 * u[4]))
    elif c == INF:      # small, round
        r = max(2.0, 0.024 * size) * (0.9 + 0.25 * u[0])
        q = 1.0 + 0.12 * u[1]
        harm = ((3, 0.03 * u[2]),)
    elif c == CON:      # thin spindle roughly along the collagen
        a = max(4.2, 0.055 * size) * (0.85 + 0.45 * u[0])
        b = max(1.25, 0.015 * size) * (0.85 + 0.3 * u[1])
        return a, b, fibre_angle + 0.3 * rng.standard_normal(), ((2, 0.05 * u[2], 2 * math.pi * u[5]),)
    elif c == DEAD:     # tiny fragment
        r = max(1.7, 0.020 * size) * (0.85 + 0.25 * u[0])
        q = 1.0 + 0.3 * u[1]
        harm = ((3, 0.05 + 0.1 * u[2]),)
    else:               # EPI: medium oval
        r = max(2.8, 0.034 * size) * (0.9 + 0.25 * u[0])
        q = 1.05 + 0.35 * u[1]
        harm = ((2, 0.04 * u[2]),)
    sq = math.sqrt(q)
    phases = 2 * math.pi * rng.random(len(harm))
    return (r * sq, r / sq, math.pi * u[5],
            tuple((k, amp, float(p)) for (k, amp), p in zip(harm, phases)))


def _blob(size: int, cy: float, cx: float, a: float, b: float, angle: float, harm: tuple):
    """Rasterise one blob in its bounding box.

    Returns (ys, xs, d, sd) or None when the box is outside the patch: ys/xs the box
    slices, d (h, w) the normalised radius (0 at the centre, 1 on the outline) and
    sd (h, w) the signed distance to the outline in pixels (> 0 inside)."""
    harm = [h for h in harm if h[1] * a >= 0.2]       # sub-pixel wobble: skip the trig
    ext = a * (1.0 + sum(h[1] for h in harm)) + 2.5
    y0, y1 = max(math.floor(cy - ext), 0), min(math.ceil(cy + ext) + 1, size)
    x0, x1 = max(math.floor(cx - ext), 0), min(math.ceil(cx + ext) + 1, size)
    if y0 >= y1 or x0 >= x1:
        return None
    dy = (np.arange(y0, y1) - cy)[:, None]           # pixel centres at integer coordinates
    dx = (np.arange(x0, x1) - cx)[None, :]
    ca, sa = math.cos(angle), math.sin(angle)
    u = ca * dx + sa * dy
    v = ca * dy - sa * dx
    uu, vv = u * u, v * v
    rho = np.sqrt(uu + vv)
    d = np.sqrt(uu * (1.0 / (a * a)) + vv * (1.0 / (b * b)))
    if harm:
        phi = np.arctan2(v, u)
        outline = 1.0
        for k, amp, ph in harm:
            outline = outline + amp * np.cos(k * phi + ph)
        d /= outline
    # Distance along the ray from the centre: outline radius rho / d minus rho.
    sd = rho * (1.0 / np.maximum(d, 1e-9) - 1.0)
    return slice(y0, y1), slice(x0, x1), d, sd


def _stain_of(rng: np.random.Generator, c: int, d: np.ndarray, tex: np.ndarray, big: bool):
    """Haematoxylin, eosin, brown concentrations (arrays or scalars) inside a nucleus
    of class ``c``; ``d`` is the normalised radius (0 centre, 1 outline), ``tex`` the
    chromatin texture under it (unit variance)."""
    if c == NEO:        # dark, coarse clumped + speckled chromatin, darker membrane
        speckle = 0.2 * tex + 0.1 * rng.standard_normal(d.shape)
        h = rng.uniform(1.45, 1.85) * (0.85 + 0.2 * np.minimum(d, 1.0)) * (1.0 + speckle)
        return h, 0.30, 0.0
    if c == INF:        # very dark, dense, homogeneous
        return rng.uniform(2.2, 2.6) * (1.0 + 0.04 * tex), 0.18, 0.0
    if c == CON:        # medium purple, a little pinker (surrounded by collagen)
        return rng.uniform(0.85, 1.05) * (1.0 + 0.08 * tex), 0.75, 0.0
    if c == DEAD:       # pale eosinophilic, pinkish-brown, ring-like
        return (0.2 + 0.3 * (d > 0.55)) * (1.0 + 0.1 * tex), 0.75, 0.45
    # EPI: lighter purple, paler vesicular interior grading to a darker rim
    rim = np.minimum(np.maximum((d - 0.3) * (1.0 / 0.55), 0.0), 1.0)
    h = rng.uniform(0.75, 0.95) * (0.55 + 0.5 * rim) * (1.0 + 0.08 * tex)
    if big:             # a small nucleolus is only resolvable in larger patches
        h = np.where(d < 0.12, 0.95, h)
    return h, 0.30, 0.0


def _place_nuclei(rng: np.random.Generator, size: int, tissue: int, fibre_angle: float,
                  inst: np.ndarray, void: np.ndarray, chrom: np.ndarray,
                  c_h: np.ndarray, c_e: np.ndarray, c_d: np.ndarray) -> list[int]:
    """Add nuclei until the patch's drawn nucleus area is reached.

    Writes local indices 1..k into ``inst``, border-ring voids into ``void`` and the
    nuclear stain into the concentration maps; returns the class of each index."""
    # Nucleus area fraction of this patch: mean ~0.17 (PanNuke background ~83 %),
    # wide spread, and a few patches with no nuclei at all.
    frac = 0.0 if rng.random() < 0.05 else float(np.clip(rng.beta(3.0, 14.0), 0.03, 0.42))
    target = frac * size * size
    cum = np.cumsum(rng.dirichlet(3.0 * _MIX[tissue] + 0.05)).tolist()  # class mix of this patch
    dead_left = int(rng.integers(1, 3)) if (frac > 0 and rng.random() < _DEAD_P[tissue]) else 0
    big = size >= 96
    brown = c_d if dead_left else None               # only dead nuclei carry brown
    soft = max(1.0, 0.004 * size)                    # edge blur width in pixels
    ring_w = max(1.0, 0.005 * size)

    max_tries = 40 + 6 * int(target / 12.0)
    cen = np.empty((max_tries, 3))                   # (cy, cx, r) of placed nuclei
    classes: list[int] = []
    filled = 0
    for _ in range(max_tries):
        if filled >= target and dead_left == 0:
            break
        if dead_left > 0 and (filled >= target or rng.random() < 0.3):
            c = DEAD
        else:
            c = int(_MIX_CLASSES[min(bisect.bisect(cum, rng.random()), 3)])  # rng.choice(p=) is slow
        a, b, angle, harm = _shape(rng, c, size, fibre_angle)
        r = math.sqrt(a * b)
        k = len(classes)
        if k and rng.random() < _P_TOUCH[c]:
            # Touching neighbour: next to an earlier nucleus, preferably of the same class.
            same = [j for j, cj in enumerate(classes) if cj == c]
            j = same[int(rng.integers(len(same)))] if same else int(rng.integers(k))
            t = 2 * math.pi * rng.random()
            dist = (r + cen[j, 2]) * rng.uniform(0.85, 1.0)
            cy, cx = cen[j, 0] + dist * math.sin(t), cen[j, 1] + dist * math.cos(t)
        else:
            cy, cx = rng.uniform(-0.2 * r, size + 0.2 * r, 2)
        if k:
            p = cen[:k]
            gap = np.hypot(p[:, 0] - cy, p[:, 1] - cx) / (p[:, 2] + r)
            if gap.min() < 0.8:                       # would hide too much of another nucleus
                continue
        blob = _blob(size, cy, cx, a, b, angle, harm)
        if blob is None:
            continue
        ys, xs, d, sd = blob
        box = inst[ys, xs]                           # view: writes go into inst
        free = box == 0
        own = (sd >= 0) & free                       # earlier nuclei keep shared pixels
        n_own = int(np.count_nonzero(own))
        if n_own < 3 or n_own < 0.4 * math.pi * a * b:
            continue
        k += 1
        box[own] = k
        if c == DEAD:
            # Fragmented: 0-2 small satellite pieces of the same instance.
            for _ in range(int(rng.integers(0, 3))):
                t = 2 * math.pi * rng.random()
                rr = r * rng.uniform(1.4, 2.0)
                sat = _blob(size, cy + rr * math.sin(t), cx + rr * math.cos(t),
                            0.55 * a, 0.55 * b, 0.0, ())
                if sat is None:
                    continue
                sys_, sxs, _, ssd = sat
                sbox = inst[sys_, sxs]
                sfree = sbox == 0
                sbox[(ssd >= 0) & sfree] = k
                salpha = np.minimum(np.maximum(ssd + 0.5, 0.0), 1.0) * sfree
                _composite(c_h, c_e, brown, sys_, sxs, salpha, 0.5, 0.75, 0.45)
        # Soft (anti-aliased) edge; pixels owned by earlier nuclei stay theirs.
        alpha = np.minimum(np.maximum(sd * (1.0 / soft) + 0.5, 0.0), 1.0) * free
        if rng.random() < _P_RING:
            # Unlabelled one-pixel ring around the outline (annotation border), drawn
            # as faint haematoxylin like a blurred nuclear edge.
            ring = (sd < 0) & (sd >= -ring_w) & free
            void[ys, xs] |= ring
            alpha = np.maximum(alpha, 0.35 * ring)
        _composite(c_h, c_e, brown, ys, xs, alpha, *_stain_of(rng, c, d, chrom[ys, xs], big))
        classes.append(c)
        cen[k - 1] = cy, cx, r
        filled += n_own
        if c == DEAD:
            dead_left -= 1
    void &= inst == 0                                # a later nucleus may cover a ring
    return classes


def _composite(c_h, c_e, c_d, ys, xs, alpha, h, e, d) -> None:
    """Blend nucleus stain (arrays or scalars) over the maps with opacity ``alpha``."""
    for m, v in ((c_h, h), (c_e, e), (c_d, d)):
        if m is None:                                # no brown in this patch
            continue
        box = m[ys, xs]
        box += alpha * (v - box)


def _add_overlap(rng: np.random.Generator, inst: np.ndarray, cls: np.ndarray,
                 ids: np.ndarray, mask: np.ndarray) -> None:
    """Make one nucleus also claim, in its own channel, the pixels of a different-class
    neighbour within one pixel of it (an annotation overlap as in PanNuke). Falls back
    to a few of its own pixels copied into another class channel."""
    k = int(rng.integers(1, len(ids)))
    me = inst == k
    grown = me.copy()                                # 4-neighbour dilation by one pixel
    grown[1:] |= me[:-1]
    grown[:-1] |= me[1:]
    grown[:, 1:] |= me[:, :-1]
    grown[:, :-1] |= me[:, 1:]
    other = grown & (inst > 0) & (cls[inst] != cls[k])
    if other.any():
        mask[..., cls[k] - 1][other] = ids[k]
        return
    ys, xs = np.nonzero(me)
    if len(ys) == 0:
        return
    pick = rng.choice(len(ys), size=min(3, len(ys)), replace=False)
    c2 = int(rng.choice([c for c in range(1, 6) if c != cls[k]]))
    # Keep ids unique per instance: the second channel gets a fresh id.
    mask[ys[pick], xs[pick], c2 - 1] = ids.max() + int(rng.integers(1, 30))
