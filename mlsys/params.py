"""The one place that reads ``params.yaml``: one dataclass per section.

Every field has a default (the small CPU configuration) and a one-line meaning;
``params.yaml`` carries the same comments. Values are checked on load so that a
typo or an impossible value fails with one line naming the key.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

CLASS_NAMES = ("background", "neoplastic", "inflammatory", "connective", "dead", "epithelial")

# The one list of the four models: which datasets (training splits) each learns from
# (model 4 for a fraction of the epochs, train.model4_epoch_fraction).
# dvc.yaml spells the same (tests/test_layout.py checks it).
MODELS: dict[str, tuple[str, ...]] = {
    "model1": ("clean",),
    "model2": ("method1",),
    "model3": ("method2",),
    "model4": ("clean", "method1", "method2"),
}
METHODS = ("method1", "method2")  # the two altered training sets, built with model 1
# The adversarial-training baselines the field compares against (docs/method.md): trained on
# the clean set by mlsys.adversarial, with the inner attack of `adversarial` in params.yaml.
BASELINES: dict[str, tuple[str, ...]] = {
    "pgdat": ("clean",),   # PGD-AT (Madry et al. 2018), optionally half clean per batch (CosPGD's recipe)
    "trades": ("clean",),  # TRADES (Zhang et al. 2019): clean CE + beta * per-pixel KL(clean || adversarial)
}
EXPERIMENT: dict[str, tuple[str, ...]] = {**MODELS, **BASELINES}  # every model trained, evaluated and reported


def baseline_label(name: str, a: "AdversarialParams") -> str:
    """A baseline in words with its settings, as the report labels it:
    "PGD-AT (2 steps, 4/255, half clean)", "TRADES (beta 6, 2 steps, 4/255)"."""
    common = f"{a.steps} step{'s' if a.steps != 1 else ''}, {a.radius:g}/255"
    if name == "pgdat":
        return f"PGD-AT ({common}{', half clean' if a.half_clean else ''})"
    if name == "trades":
        return f"TRADES (beta {a.beta:g}, {common})"
    raise ValueError(f"baseline_label: {name!r} is not one of {list(BASELINES)}")


def method_tag(model: str) -> str:
    """Which augmentation methods a model's training sets come from ("clean" for model 1),
    or the baseline's own name (``pgdat``, ``trades``), so that filtering runs by
    ``tags.`mlsys.method``` finds a method's set and its models."""
    if model in BASELINES:
        return model
    return "+".join(s for s in MODELS[model] if s != "clean") or "clean"


# PanNuke's evaluation protocols (docs/data.md). "official": train on one fold, validate on a
# second, test on the third. The three named splits are CellViT's (TIO-IKIM/CellViT,
# logs_paper/PanNuke/*/Fold-{1,2,3}/config.yaml: train/val/test folds [0]/[1]/[2], [1]/[0]/[2],
# [2]/[1]/[0] of its 0-based renaming of PanNuke's folds 1..3): split -> (train, valid, test) fold.
PROTOCOLS = ("pooled", "official")
OFFICIAL_SPLITS: dict[int, tuple[int, int, int]] = {1: (1, 2, 3), 2: (2, 1, 3), 3: (3, 2, 1)}

AUTO = "auto"  # a fast-path switch chosen from what the device computes well (mlsys.hardware)
Switch = typing.Union[bool, typing.Literal["auto"]]  # true, false or "auto"


class InputError(Exception):
    """Bad input the user can fix (params, data, weights, a stale build): the CLI reports it
    as one line, ``mlsys <stage>: error: <message>``, exit status 2."""


class ParamsError(InputError, ValueError):
    """A parameter has the wrong type or an impossible value."""


@dataclass
class DataParams:
    source: str = "synthetic"      # "synthetic" (built-in generator) or "pannuke" (your own copy)
    protocol: str = "pooled"       # "pooled": one fold split at random (the paper); "official": PanNuke's three folds
    pannuke_path: str = ""         # pooled: PanNuke fold, the downloaded zip or its unpacked "Fold N" folder
    fold: int = 2                  # pooled: PanNuke fold number inside pannuke_path (the paper uses 2)
    pannuke_folds: list[str] = field(default_factory=list)  # official: folds 1, 2, 3 (zips or folders), or one folder of all three
    official_split: int = 1        # official: 1 = train fold 1/valid 2/test 3, 2 = 2/1/3, 3 = 3/2/1 (CellViT's Fold-1..3)
    n_images: int = 300            # synthetic: number of patches generated
    image_size: int = 32           # synthetic: patch side in pixels (PanNuke: 256)
    synthetic_seed: int = 0        # synthetic: generator seed (same seed -> same patches)
    normalise: str = "minmax"      # "minmax": each image to [0, 1] (original code); "255": divide by 255
    split: list[int] = field(default_factory=lambda: [6, 1, 2])  # pooled: train:valid:test ratio
    split_seed: int = 42           # pooled: shuffle seed of the split (original code: 42)


@dataclass
class ModelParams:
    base: int = 8                  # filters of the first U-Net section (paper: 64)
    depth: int = 3                 # pooling steps; image side must be divisible by 2**depth (paper: 3)
    dropout: float = 0.2           # dropout probability in the up path (paper: 0.2)
    n_classes: int = 6             # output classes: background + 5 nucleus types
    variant: str = "original"      # "original": the authors' Keras model layer for layer; "standard": textbook U-Net
    init: str = "glorot"           # "glorot": Keras default, what the authors' model gets; "he": Kaiming normal


@dataclass
class TrainParams:
    epochs: int = 40               # passes over the training set (paper: 60)
    batch_size: int = 8            # images per optimiser step (paper: 18; 8 converges at the CPU default)
    lr: float = 0.004              # Adam learning rate before any decay (paper: 0.004)
    lr_decay: float = 0.1          # lr is multiplied by exp(-lr_decay) every lr_step epochs
    lr_step: int = 10              # epochs between learning-rate decays (paper: 10)
    schedule: str = "keras"        # "keras": first decay already at epoch 0 (authors' code); "step": from epoch lr_step
    keep: str = "best"             # weights kept: "best" = lowest validation loss (authors' code), "last" = last epoch
    model4_epoch_fraction: float = 0.3333333333  # model 4 trains this fraction of `epochs` (3x the data)
    seed: int = 0                  # weight init, shuffle and dropout seed; the stages set it from `seeds`
    device: str = "auto"           # "auto" (cuda if available), "cpu" or "cuda[:i]"
    amp: bool = False              # bf16 autocast on CUDA
    channels_last: bool = False    # channels-last memory format on CUDA
    compile: bool = False          # wrap the model in torch.compile


@dataclass
class AdversarialParams:
    """The adversarial-training baselines (mlsys.adversarial); the rest of their training
    (batch, lr and its schedule, keep, device) is ``train``'s. Literature: radius 8/255 (4/255
    for segmentation, CosPGD/SegPGD-AT), 5-10 inner steps; the CPU default takes 2 steps, a
    "fast AT" with a random start (benchmarks/results/adversarial_default_cpu.json: the cost)."""
    radius: float = 4.0            # L-inf radius of the inner attack on the 0..255 scale (eps = radius/255)
    steps: int = 2                 # inner attack iterations, PGD-AT and TRADES (Madry: 7; CosPGD-AT: 3-5)
    step_size: float = 2.5         # inner step on the 0..255 scale (1.25 * radius / steps: fast AT's 1.25 eps, over 2 steps)
    half_clean: bool = True        # PGD-AT: attack half of each batch, keep half clean (CosPGD's segmentation recipe)
    beta: float = 6.0              # TRADES: weight of the KL term (Zhang et al.: 6)
    trades_start: float = 0.001    # TRADES: std of the Gaussian start of the KL ascent (authors' code: 0.001)
    epochs: int = 20               # passes over the clean set (train.epochs: 40; an epoch costs ~1.7-1.8 clean ones)


@dataclass
class AttackParams:
    mode: str = "faithful"         # "faithful" (original code: iterated FGSM, no projection) or "standard" PGD
    eps: float = 0.01              # faithful: step per iteration; standard: L-inf radius (images in [0, 1])
    alpha: float = 0.0025          # standard: step size per iteration
    steps: int = 100               # iterations (paper: 100)
    target: int = 0                # full-area target class (0 = background, as in the paper)
    random_start: bool = False     # standard: start from a uniform point in the eps-ball
    batch_size: int = 32           # images attacked at once
    amp: Switch = False            # bf16 autocast: faster, but the gradients change; "auto": on CUDA with bf16 only
    channels_last: Switch = AUTO   # channels-last inputs, the same attack: "auto" = on (faster on CPUs and GPUs)
    compile: bool = False          # torch.compile the U-Net of the attack (minutes of compiling first)


@dataclass
class RobustParams:
    """The field's robustness protocol (docs/robustness.md), run beside the paper's attack:
    per image the worst of ``attacks`` at each radius.
    The default fits the CPU default (at most doubles the evaluate stage on 2 cores); paper
    scale: radii [0.25, 0.5, 1, 2, 4, 8], steps 100-300 (SEA: 300 per loss), ~17-52 GPU-minutes
    per model and seed (the estimate is in params.yaml)."""
    enabled: bool = True           # run the protocol in the evaluate stage
    attacks: list[str] = field(default_factory=lambda: ["segpgd", "cospgd", "sea"])  # of mlsys.robust.ATTACKS
    radii: list[float] = field(default_factory=lambda: [1.0, 4.0, 8.0])  # L-inf radii on the 0..255 scale (eps = r/255)
    steps: int = 4                 # iterations of each attack (SEA: per loss); the field runs 100-300
    curve_every: int = 1           # metrics every k steps along each attack (curves over the iterations)


@dataclass
class EvaluateParams:
    device: str = "auto"           # "auto" (cuda if available), "cpu" or "cuda[:i]"
    batch_size: int = 32           # images per forward pass
    paper_threshold: float = 0.1   # "paper" Dice/Jaccard: softmax threshold per channel (original code)
    n_panel: int = 4               # test images shown in the prediction panels
    attack: AttackParams = field(default_factory=lambda: AttackParams(steps=20))
    robust: RobustParams = field(default_factory=RobustParams)  # per image worst case of untargeted attacks


@dataclass
class Method1Params:
    eps: float = 0.01              # attack step (faithful) or radius (standard)
    alpha: float = 0.0025          # standard mode: step size
    steps: int = 10                # iterations per class pass (paper: 100)
    mode: str = "faithful"         # attack mode, as in AttackParams
    batch_size: int = 32           # images attacked at once (also the HDF5 chunk written)
    amp: Switch = False            # bf16 autocast of the attack, as AttackParams.amp ("auto": CUDA with bf16 only)
    channels_last: Switch = AUTO   # channels-last inputs, the same attack: "auto" = on (faster on CPUs and GPUs)
    compile: bool = False          # torch.compile the U-Net of the attack


@dataclass
class Method2Params:
    eps: float = 0.01              # size of each per-class FGSM direction
    score: str = "l1"              # "l1": mean |onehot - softmax| (original code); "ce": cross-entropy
    select: str = "argmin"         # "argmin": best match to the true mask (enhance); "argmax": adversarial
    chunk: int = 243               # candidates per forward pass (divides 729 = 3^6)
    batch_size: int = 8            # images whose directions are computed at once
    search: str = "exact"          # "exact": score all 3^C candidates (paper); "screened": a local search
    screen_k: int = 8              # screened: candidates scored per round, the best of a separable guess
    amp: Switch = AUTO             # bf16-autocast forwards screen, fp32 rescoring decides; "auto": where bf16 is native
    exact_top: int = 16            # amp: the best bf16-scored candidates rescored in fp32
    channels_last: Switch = AUTO   # candidates in channels-last memory format (weights untouched); "auto" = on
    compile: bool = False          # torch.compile the U-Net forward of the search


@dataclass
class AugmentParams:
    device: str = "auto"           # "auto", "cpu" or "cuda[:i]"
    method1: Method1Params = field(default_factory=Method1Params)
    method2: Method2Params = field(default_factory=Method2Params)


@dataclass
class TrackingParams:
    experiment: str = "mlsys"      # MLflow experiment name (MLFLOW_EXPERIMENT_NAME wins)
    log_model: bool = True         # log each trained U-Net as an MLflow model


@dataclass
class NprocParams:
    train: int = 1                 # DDP processes; train.batch_size is the global batch, split evenly
    augment: int = 1               # processes building a method's set (rank 0 merges: identical result)
    evaluate: int = 1              # processes evaluating a model (rank 0 merges: identical result)


@dataclass
class DistributedParams:
    nproc: NprocParams = field(default_factory=NprocParams)  # per stage; > 1 launches torchrun
    timeout_s: float = 300.0       # a collective waiting longer than this (dead peer) fails the stage


@dataclass
class Params:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # training seeds: the whole experiment per seed
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    augment: AugmentParams = field(default_factory=AugmentParams)
    adversarial: AdversarialParams = field(default_factory=AdversarialParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    distributed: DistributedParams = field(default_factory=DistributedParams)

    def validate(self) -> "Params":
        d, m, t = self.data, self.model, self.train
        _check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0,
               "seeds", self.seeds, "a list of distinct non-negative integers, e.g. [0, 1, 2]")
        _check(d.source in ("synthetic", "pannuke"), "data.source", d.source, '"synthetic" or "pannuke"')
        _check(d.normalise in ("minmax", "255"), "data.normalise", d.normalise, '"minmax" or "255"')
        _check(d.protocol in PROTOCOLS, "data.protocol", d.protocol, '"pooled" or "official"')
        _check(d.protocol == "pooled" or d.source == "pannuke", "data.protocol", d.protocol,
               '"pooled" with data.source synthetic (the official protocol splits PanNuke\'s three folds)')
        _check(d.official_split in OFFICIAL_SPLITS, "data.official_split", d.official_split,
               "1, 2 or 3 (" + "; ".join(f"{k}: train fold {a}, valid {b}, test {c}"
                                          for k, (a, b, c) in OFFICIAL_SPLITS.items()) + ")")
        _check(len(d.pannuke_folds) in (0, 1, 3), "data.pannuke_folds", d.pannuke_folds,
               "PanNuke's three folds [fold 1, fold 2, fold 3] (zips or folders), or one folder holding all three")
        _check(len(d.split) == 3 and all(r >= 0 for r in d.split) and d.split[0] > 0
               and d.split[1] > 0 and d.split[2] > 0, "data.split", d.split,
               "three positive ratios train:valid:test")
        _check(d.n_images >= 3, "data.n_images", d.n_images, "at least 3")
        _check(d.fold >= 1, "data.fold", d.fold, "a PanNuke fold number (1, 2 or 3)")
        _check(m.depth >= 1, "model.depth", m.depth, ">= 1")
        _check(d.image_size > 0 and d.image_size % 2**m.depth == 0, "data.image_size",
               d.image_size, f"a positive multiple of 2**model.depth = {2**m.depth}")
        _check(m.base >= 1, "model.base", m.base, ">= 1")
        _check(0 <= m.dropout < 1, "model.dropout", m.dropout, "in [0, 1)")
        _check(2 <= m.n_classes <= 6, "model.n_classes", m.n_classes, "2..6")
        _check(t.epochs >= 1, "train.epochs", t.epochs, ">= 1")
        _check(t.batch_size >= 1, "train.batch_size", t.batch_size, ">= 1")
        _check(t.lr > 0, "train.lr", t.lr, "> 0")
        _check(t.lr_step >= 1, "train.lr_step", t.lr_step, ">= 1")
        _check(t.lr_decay >= 0, "train.lr_decay", t.lr_decay, ">= 0")
        _check(t.schedule in ("keras", "step"), "train.schedule", t.schedule, '"keras" or "step"')
        _check(t.keep in ("best", "last"), "train.keep", t.keep, '"best" or "last"')
        for key, dev in (("train.device", t.device), ("augment.device", self.augment.device),
                         ("evaluate.device", self.evaluate.device)):
            _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", dev) is not None, key, dev,
                   '"auto", "cpu", "cuda" or "cuda:<index>"')
        _check(0 < t.model4_epoch_fraction <= 1, "train.model4_epoch_fraction",
               t.model4_epoch_fraction, "in (0, 1]")
        for name, a in (("evaluate.attack", self.evaluate.attack), ("augment.method1", self.augment.method1)):
            _check(a.eps >= 0, f"{name}.eps", a.eps, ">= 0")
            _check(a.alpha >= 0, f"{name}.alpha", a.alpha, ">= 0")
            _check(a.steps >= 1, f"{name}.steps", a.steps, ">= 1")
            _check(a.batch_size >= 1, f"{name}.batch_size", a.batch_size, ">= 1")
        _check(0 <= self.evaluate.attack.target < m.n_classes, "evaluate.attack.target",
               self.evaluate.attack.target, f"a class id in 0..{m.n_classes - 1}")
        m2 = self.augment.method2
        _check(m2.eps >= 0, "augment.method2.eps", m2.eps, ">= 0")
        _check(m2.chunk >= 1, "augment.method2.chunk", m2.chunk, ">= 1")
        _check(m2.batch_size >= 1, "augment.method2.batch_size", m2.batch_size, ">= 1")
        _check(m2.search != "screened" or 1 <= m2.screen_k <= 3**m.n_classes, "augment.method2.screen_k", m2.screen_k,
               f"1..3**model.n_classes = {3**m.n_classes}")
        _check(m2.exact_top >= 1, "augment.method2.exact_top", m2.exact_top, ">= 1")
        a = self.adversarial
        _check(a.radius >= 0, "adversarial.radius", a.radius, ">= 0 (on the 0..255 scale)")
        _check(a.steps >= 1, "adversarial.steps", a.steps, ">= 1")
        _check(a.step_size > 0, "adversarial.step_size", a.step_size, "> 0 (on the 0..255 scale)")
        _check(a.beta >= 0, "adversarial.beta", a.beta, ">= 0")
        _check(a.trades_start >= 0, "adversarial.trades_start", a.trades_start, ">= 0")
        _check(a.epochs >= 1, "adversarial.epochs", a.epochs, ">= 1")
        _check(self.evaluate.batch_size >= 1, "evaluate.batch_size", self.evaluate.batch_size, ">= 1")
        _check(0 < self.evaluate.paper_threshold < 1, "evaluate.paper_threshold",
               self.evaluate.paper_threshold, "in (0, 1)")
        _check(self.evaluate.n_panel >= 1, "evaluate.n_panel", self.evaluate.n_panel, ">= 1")
        _check_robust(self.evaluate.robust)
        for stage in ("train", "augment", "evaluate"):
            n = getattr(self.distributed.nproc, stage)
            _check(n >= 1, f"distributed.nproc.{stage}", n, ">= 1")
        n = self.distributed.nproc.train
        _check(t.batch_size % n == 0, "train.batch_size", t.batch_size,
               f"a multiple of distributed.nproc.train = {n} (the global batch is split evenly)")
        _check(self.distributed.timeout_s > 0, "distributed.timeout_s", self.distributed.timeout_s, "> 0")
        return self


def _check_robust(r: RobustParams) -> None:
    # the attack names are checked by the code that runs them (mlsys.robust.check)
    _check(len(r.radii) >= 1 and len(set(r.radii)) == len(r.radii) and min(r.radii) > 0,
           "evaluate.robust.radii", r.radii, "distinct positive radii on the 0..255 scale, e.g. [1, 4, 8]")
    _check(r.steps >= 1, "evaluate.robust.steps", r.steps, ">= 1")
    _check(r.curve_every >= 1, "evaluate.robust.curve_every", r.curve_every, ">= 1")



def _check(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ParamsError(f"params: {key} = {value!r} is invalid; expected {expected}")


def _build(cls, raw, prefix: str):
    """Build dataclass ``cls`` from a mapping, checking unknown keys and types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"params: {prefix[:-1] or 'the file'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ParamsError(f"params: unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key, value, hint = prefix + f.name, raw[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, value, key + ".")
        else:
            kwargs[f.name] = _coerce(key, value, hint)
    return cls(**kwargs)


def _coerce(key: str, value, hint):
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"params: {key} = {value!r} is invalid; expected a list")
        (item,) = typing.get_args(hint)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint == Switch:
        if not isinstance(value, bool) and value != AUTO:
            raise ParamsError(f"params: {key} = {value!r} is invalid; expected true, false or \"auto\"")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"params: {key} = {value!r} is invalid; expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"params: {key} = {value!r} is invalid; expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"params: {key} = {value!r} is invalid; expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ParamsError(f"params: {key} = {value!r} is invalid; expected a string")
        return str(value)
    return value


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; a missing file gives the defaults."""
    import yaml  # here, not at import: the kernels' modules import this one on GPU machines without yaml

    path = Path(path)
    raw = {}
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ParamsError(f"params: {path} is not valid YAML: {err}".splitlines()[0]) from None
    if isinstance(raw, dict) and isinstance(raw.get("train"), dict) and "seed" in raw["train"]:
        raise ParamsError("params: train.seed is not read; every stage takes its seed from `seeds` "
                          "(e.g. seeds: [0, 1, 2])")
    return _build(Params, raw, "").validate()


def show_progress() -> bool:
    """Progress bars on long work, unless MLSYS_PROGRESS=0 (tests, logs)."""
    return os.environ.get("MLSYS_PROGRESS", "1") != "0"


def section_dict(obj) -> dict:
    """A section as a flat ``{"a.b": value}`` dict, for logging as MLflow params."""
    flat: dict[str, object] = {}

    def walk(prefix: str, value) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(f"{prefix}{f.name}.", getattr(value, f.name))
        else:
            flat[prefix[:-1]] = value

    walk("", obj)
    return flat
