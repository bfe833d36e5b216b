"""Any model, any data: the field's robustness protocol (``evaluate.robust``, docs/robustness.md)
on a segmentation model that is not ours, as ``mlsys robust MODEL DATA`` and, for notebooks,
:func:`evaluate_model`. The attacks, radii, steps, per-chunk seeds and metrics are the evaluate
stage's own (``evaluate.robust_chunk``), so our U-Net gets here the numbers the stage records.

MODEL (:func:`load_model`):
  - an MLflow model URI (``runs:/<run>/model``, ``models:/mlsys-unet@champion``), resolved
    against the project's tracking store (``tracking.tracking_uri()``); pickled MLflow models
    are refused by MLflow unless MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true;
  - a TorchScript file ``*.pt`` (``torch.jit.load``);
  - a torch.export file ``*.pt2`` (``torch.export.load``, after MLflow's check that the archive
    holds no pickle);
  - ``package.module:function`` returning an ``nn.Module``, importable from the working folder
    or PYTHONPATH, with ``--weights FILE``: its state_dict (``torch.load(weights_only=True)``).
  Whatever it is, it must map images (N, 3, H, W) float in [0, 1] to logits (N, C, H, W) of
  the same H, W, differentiably in the images, with 2 <= C <= 6 (the metrics name classes by
  ``mlsys.params.CLASS_NAMES``). It is attacked as loaded, in inference mode: :class:`Attackable`
  makes train()/eval() no-ops, which an exported program (what the registry holds) needs, as
  it refuses both; an exported program takes the input shapes it was exported for (the
  registry's U-Net: any batch, any height and width the U-Net takes, ``tracking.log_model``).

DATA: our HDF5 format (mlsys.data; one split, ``--split``, default test; per-tissue metrics from
/tissue; SEA's class weights from its training split) or a folder of PNG files
(:func:`read_png_folder`): ``DATA/images/<stem>.png`` 8-bit RGB and ``DATA/masks/<stem>.png``
single-channel class ids (0 = background), the same stems, every image the same size.

No stage imports this module: editing it re-runs nothing.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from .evaluate import log_robust, robust_chunk, robust_curve_rows, robust_merge, robust_results, train_class_weights
from .metrics import SegMetrics
from .params import CLASS_NAMES, EvaluateParams, InputError, Params
from .results import json_clean, radius_key

PNG_LAYOUT = ("DATA/images/<stem>.png (8-bit RGB) and DATA/masks/<stem>.png (single-channel class ids, "
              "0 = background), the same stems")
NO_CURVE = {"steps": [], "dice": [], "accuracy": []}  # no paper attack here: log_robust's paper curve


class ModelError(InputError, ValueError):
    """A model that cannot be loaded or is not a segmentation model the protocol can attack."""


# --------------------------------------------------------------------------- models
class Attackable(nn.Module):
    """A foreign model as the protocol's attacks take it: ``head.out_channels`` = its class
    count (what ``robust_chunk`` reads), and train()/eval() that change only this wrapper's
    flag -- the model stays in the inference mode it was loaded in (an exported program
    refuses both calls; a model's own mode is set once, by :func:`attackable`)."""

    def __init__(self, model: nn.Module, n_classes: int):
        super().__init__()
        self.model = model
        self.head = _Head(n_classes)

    def train(self, mode: bool = True) -> "Attackable":
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@dataclasses.dataclass
class _Head:
    out_channels: int


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def is_uri(source: str) -> bool:
    """``runs:/...``, ``models:/...``, ``file:///...``, ``s3://...``: an MLflow model URI."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", source) is not None


def load_model(source: str, weights: str | None = None) -> tuple[nn.Module, str]:
    """The model named by ``source`` (module docstring), on the CPU: (module, kind), kind one
    of "mlflow", "torchscript", "torch.export", "module:function". One-line ModelError for a
    file that is missing or unreadable, a URI MLflow cannot load, a function that is not found
    or returns no nn.Module, missing or mismatched --weights."""
    if weights is not None and not re.match(r"^[\w.]+:\w+$", source):
        raise ModelError(f"--weights goes with a MODEL of the form module:function, not {source!r}")
    if is_uri(source):
        return _load_mlflow(source), "mlflow"
    path = Path(source)
    if path.suffix in (".pt", ".pt2"):
        if not path.is_file():
            raise ModelError(f"model file {source} does not exist")
        if path.suffix == ".pt":
            try:
                return torch.jit.load(str(path), map_location="cpu"), "torchscript"
            except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, ValueError, ...
                raise ModelError(f"{source} is not a TorchScript file ({_first_line(err)}); a state_dict "
                                 "goes with MODEL module:function and --weights FILE") from None
        return _load_exported(path), "torch.export"
    if re.match(r"^[\w.]+:\w+$", source):
        return _load_function(source, weights), "module:function"
    raise ModelError(f"MODEL {source!r} is none of: an MLflow model URI (runs:/..., models:/...), "
                     "a TorchScript .pt file, a torch.export .pt2 file, module:function with --weights")


def _load_mlflow(uri: str) -> nn.Module:
    import mlflow

    from . import tracking

    store = tracking.tracking_uri()
    tracking.probe(store)  # an unreachable server: one line now, not minutes of retries
    mlflow.set_tracking_uri(store)
    try:
        return mlflow.pytorch.load_model(uri, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - MlflowException, OSError, torch errors
        raise ModelError(f"MLflow model {uri} could not be loaded from {tracking.redact(store)}: "
                         f"{_first_line(err)}") from None


def _load_exported(path: Path) -> nn.Module:
    try:  # torch.export.load unpickles parts of the archive: refuse one that holds a pickle
        from mlflow.pytorch import _validate_pt2_archive_is_pickle_free as pickle_free
    except ImportError:  # an MLflow without the check: load as torch does
        pickle_free = None
    try:
        if pickle_free is not None:
            pickle_free(str(path))
        return torch.export.load(str(path)).module()
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"{path} is not a loadable torch.export program ({_first_line(err)})") from None


def _load_function(source: str, weights: str | None) -> nn.Module:
    import importlib

    if weights is None:
        raise ModelError(f"MODEL {source} (module:function) needs --weights FILE, its state_dict")
    module_name, func_name = source.rsplit(":", 1)
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as err:
        raise ModelError(f"{source}: {_first_line(err)} (the module must be importable from the working "
                         "folder or PYTHONPATH)") from None
    try:
        model = func()
    except Exception as err:  # noqa: BLE001 - whatever the user's builder raises
        raise ModelError(f"{source}() failed: {_first_line(err)}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{source}() returned {type(model).__name__}, not a torch.nn.Module")
    if not Path(weights).is_file():
        raise ModelError(f"weights file {weights} does not exist")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle refusals, zip errors
        raise ModelError(f"weights {weights} are not a state_dict torch.load(weights_only=True) reads "
                         f"({_first_line(err)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a checkpoint holding one
    try:
        model.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - RuntimeError naming missing/unexpected keys, TypeError
        raise ModelError(f"weights {weights} do not fit {source}(): {_first_line(err)}") from None
    return model


def attackable(model: nn.Module, images: torch.Tensor, where: str = "the model") -> Attackable:
    """``model`` in inference mode, wrapped as :class:`Attackable`, after one forward of
    images (n, 3, H, W) (a few of the data's) checks that it gives logits (n, C, H, W),
    2 <= C <= len(CLASS_NAMES), with a gradient in the images. ModelError otherwise."""
    if isinstance(model, Attackable):
        model = model.model
    try:
        model.eval()
    except NotImplementedError:  # an exported program: inference mode is baked in at export
        pass
    x = images.detach().clone().requires_grad_(True)
    n, _, h, w = x.shape
    try:
        with torch.enable_grad():
            out = model(x)
    except Exception as err:  # noqa: BLE001 - guards of exported programs, shape errors, ...
        hint = (" (a torch.export program accepts only the input shapes it was exported for; the registry's "
                "U-Net takes any size whose sides divide by 2**depth)" if isinstance(model, torch.fx.GraphModule)
                else "")
        raise ModelError(f"{where} fails on images of shape {tuple(x.shape)}: {_first_line(err)}{hint}") from None
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"{where} returns {type(out).__name__}, not a logits tensor (N, C, H, W)")
    if out.dim() != 4 or out.shape[0] != n or tuple(out.shape[2:]) != (h, w):
        raise ModelError(f"{where} gives output {tuple(out.shape)} for images {tuple(x.shape)}; expected "
                         f"logits (N, C, H, W) = ({n}, C, {h}, {w})")
    if not out.is_floating_point():
        raise ModelError(f"{where} gives {out.dtype} output; expected float logits")
    C = out.shape[1]
    if not 2 <= C <= len(CLASS_NAMES):
        raise ModelError(f"{where} gives {C} classes; the metrics know 2 to {len(CLASS_NAMES)} "
                         f"(mlsys.params.CLASS_NAMES: {', '.join(CLASS_NAMES)})")
    if not out.requires_grad:
        raise ModelError(f"{where} gives no gradient with respect to its input images; the attacks need one")
    return Attackable(model, C)


def check_data(images: torch.Tensor, masks: torch.Tensor, n_classes: int, where: str) -> None:
    """Images (N, 3, H, W) finite in [0, 1] and masks (N, H, W) of class ids 0..n_classes-1;
    one-line InputError naming ``where`` otherwise."""
    if images.dim() != 4 or images.shape[1] != 3 or masks.shape != (images.shape[0], *images.shape[2:]):
        raise InputError(f"{where}: images {tuple(images.shape)} and masks {tuple(masks.shape)} are not "
                         "(N, 3, H, W) and (N, H, W)")
    if not images.is_floating_point() or not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        lo, hi = float(images.min()), float(images.max())
        raise InputError(f"{where}: images must be finite floats in [0, 1], found values in [{lo:g}, {hi:g}]")
    if masks.is_floating_point() or masks.min() < 0 or masks.max() >= n_classes:
        raise InputError(f"{where}: masks hold class ids {int(masks.min())}..{int(masks.max())} but the model "
                         f"gives {n_classes} classes (ids 0..{n_classes - 1})")


# --------------------------------------------------------------------------- data
def read_png_folder(folder: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A folder of PNG files laid out as ``PNG_LAYOUT``: images (N, 3, H, W) float32 = RGB / 255,
    masks (N, H, W) int64 class ids, and the stems in sorted order. InputError naming the
    file for a missing partner, another mode or size, or an unreadable file."""
    from PIL import Image

    folder = Path(folder)
    imgs, msks = folder / "images", folder / "masks"
    if not imgs.is_dir() or not msks.is_dir():
        raise InputError(f"{folder} is no HDF5 file and has no images/ and masks/ folders; expected {PNG_LAYOUT}")
    stems = sorted(p.stem for p in imgs.glob("*.png"))
    mask_stems = {p.stem for p in msks.glob("*.png")}
    if not stems:
        raise InputError(f"{imgs} holds no .png images; expected {PNG_LAYOUT}")
    missing, extra = [s for s in stems if s not in mask_stems], sorted(mask_stems - set(stems))
    if missing or extra:
        raise InputError(f"{folder}: images and masks do not pair up (no mask for {missing[:3]}, no image for "
                         f"{extra[:3]}); expected {PNG_LAYOUT}")

    def read(path: Path, modes: tuple[str, ...], what: str) -> np.ndarray:
        try:
            with Image.open(path) as im:
                if im.mode not in modes:
                    raise InputError(f"{path} is a {im.mode} PNG; {what}")
                return np.asarray(im)
        except InputError:
            raise
        except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ...
            raise InputError(f"{path} is not a readable PNG ({_first_line(err)})") from None

    images, masks = [], []
    for s in stems:
        img = read(imgs / f"{s}.png", ("RGB",), "images must be 8-bit RGB")
        mask = read(msks / f"{s}.png", ("L", "P", "I", "I;16"), "masks must be single-channel class ids (L, P or I)")
        if mask.shape != img.shape[:2] or (images and img.shape != images[0].shape):
            raise InputError(f"{folder}: {s}.png is image {img.shape[:2]}, mask {mask.shape}; every image and "
                             f"mask must be {images[0].shape[:2] if images else img.shape[:2]}")
        images.append(img)
        masks.append(mask.astype(np.int64))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)
    return x.contiguous(), torch.from_numpy(np.stack(masks)), stems


# --------------------------------------------------------------------------- the protocol
def protocol(base: EvaluateParams, attacks: list[str] | None = None, radii: list[float] | None = None,
             steps: int | None = None, curve_every: int | None = None) -> EvaluateParams:
    """``base`` (params.yaml's evaluate section) with the protocol enabled and any of its
    settings replaced; checked as params.yaml's (one-line ParamsError)."""
    from .robust import check

    rc = base.robust
    rc = dataclasses.replace(rc, enabled=True, attacks=list(rc.attacks if attacks is None else attacks),
                             radii=[float(r) for r in (rc.radii if radii is None else radii)],
                             steps=rc.steps if steps is None else steps,
                             curve_every=rc.curve_every if curve_every is None else curve_every)
    cfg = dataclasses.replace(base, robust=rc)
    Params(evaluate=cfg).validate()
    check(rc)
    return cfg


Chunk = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor]  # images, masks, bits, tissue ids


def run_protocol(model: Attackable, chunks: Iterable[Chunk], n_images: int, cfg: EvaluateParams,
                 tissues: list[str], weights: torch.Tensor | None, weights_source: str,
                 progress: bool = False) -> dict:
    """``robust_chunk`` on each chunk (its number seeds the attacks' starts, as in the evaluate
    stage), merged: {"clean": metrics, "robust": the evaluate JSON's "robust" section (without
    its paper-attack curve: no paper attack runs here)}. ``tissues``: the names the chunks'
    tissue ids index ([]: no per-tissue metrics)."""
    from .hardware import pick_device
    from .progress import bar

    device, C = pick_device(cfg.device), model.head.out_channels
    model = model.to(device)
    summed: dict[str, np.ndarray] = {}
    per_image = []
    with bar(n_images, "robust", "img", progress) as shown:
        for j, (images, masks, bits, tissue) in enumerate(chunks):
            check_data(images, masks, C, "data")
            part = robust_chunk(model, images.to(device), masks.to(device), bits if C == len(CLASS_NAMES) else None,
                                tissue, max(len(tissues), 1), j, cfg, weights)
            per_image.append(part.pop("images_robust"))
            for k, v in part.items():
                summed[k] = summed[k] + v if k in summed else v.copy()
            shown.update(len(images))
    if not per_image:
        raise InputError("data: no images to evaluate")
    S = summed["robust_worst"].shape[-1]
    merged = robust_merge({**summed, "paper_curve": np.zeros((0, S))}, cfg, tissues, C,
                          np.concatenate(per_image, axis=2))
    merged.update(class_weights=None if weights is None else weights.tolist(), class_weights_source=weights_source)
    section = robust_results(merged)
    del section["paper_curve"]
    clean = SegMetrics.from_state(summed["robust_tissue_clean"].sum(0), C, cfg.paper_threshold)
    return {"clean": json_clean(clean.result()), "robust": section, "n_images": n_images, "n_classes": C}


def tensor_chunks(images: torch.Tensor, masks: torch.Tensor, tissue: torch.Tensor, size: int,
                  bits: torch.Tensor | None = None) -> Iterator[Chunk]:
    for s in range(0, len(images), size):
        yield (images[s:s + size], masks[s:s + size], None if bits is None else bits[s:s + size],
               tissue[s:s + size])


def evaluate_model(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, *,
                   attacks: list[str] | None = None, radii: list[float] | None = None, steps: int | None = None,
                   curve_every: int | None = None, tissues: list[str] | None = None,
                   class_weights: torch.Tensor | None = None, channels: torch.Tensor | None = None,
                   params: EvaluateParams | None = None, progress: bool = False) -> dict:
    """The protocol on any segmentation model in a notebook.

    model: maps images (N, 3, H, W) float in [0, 1] to logits (N, C, H, W); put in inference
    mode (eval()) for the run. images: (N, 3, H, W) float in [0, 1]; masks: (N, H, W) class
    ids 0..C-1. attacks, radii (0..255 scale), steps, curve_every: override ``params.robust``
    (default: params.yaml's ``evaluate`` section, its defaults where there is none).
    tissues: a name per image (per-tissue metrics) or None. class_weights: SEA's Mask-CE-Bal
    weights (C,), e.g. ``robust.inverse_frequency`` of the training masks' pixel counts; None:
    per image (a fallback). channels: our HDF5's channel bits (N, H, W) for the "paper" metrics
    (``data.load_split(..., channels=True)``), None: scored against the masks. Returns {"clean", "robust" (laid out as the evaluate JSON's),
    "n_images", "n_classes"}."""
    from .params import load_params

    cfg = protocol(params or load_params().evaluate, attacks, radii, steps, curve_every)
    images, masks = torch.as_tensor(images), torch.as_tensor(masks)
    if images.dim() != 4 or len(images) == 0:
        raise InputError(f"images {tuple(images.shape)} are not (N >= 1, 3, H, W)")
    net = attackable(model, images[:2].float())
    check_data(images, masks, net.head.out_channels, "data")
    names = sorted(set(tissues)) if tissues is not None else []
    if tissues is not None and len(tissues) != len(images):
        raise InputError(f"{len(tissues)} tissue names for {len(images)} images")
    ids = torch.tensor([names.index(t) for t in tissues] if tissues is not None else [0] * len(images))
    source = ("given class weights" if class_weights is not None
              else "per-image inverse class frequency (fallback: no training split given)")
    chunks = tensor_chunks(images.float(), masks.long(), ids, cfg.attack.batch_size, channels)
    return run_protocol(net, chunks, len(images), cfg, names, class_weights, source, progress)


# --------------------------------------------------------------------------- outputs
def default_name(source: str) -> str:
    """A folder name for a model source: a file's stem, a function's name, a URI's path
    (``models:/mlsys-unet@champion`` -> ``mlsys-unet-champion``)."""
    if is_uri(source):
        tail = source.split(":/", 1)[1]
    elif re.match(r"^[\w.]+:\w+$", source):
        tail = source.rsplit(":", 1)[1]
    else:
        tail = Path(source).stem
    return re.sub(r"[^A-Za-z0-9._-]+", "-", tail).strip("-.") or "model"


def radius_rows(res: dict) -> list[dict]:
    """Worst case per radius (0 = clean): radius, dice, accuracy."""
    rob = res["robust"]
    rows = [{"radius": 0.0, "dice": res["clean"]["dice"], "accuracy": res["clean"]["accuracy"]}]
    rows += [{"radius": float(r), "dice": rob["worst"][radius_key(r)]["dice"],
              "accuracy": rob["worst"][radius_key(r)]["accuracy"]} for r in rob["radii"]]
    return [{k: math.nan if v is None else v for k, v in row.items()} for row in rows]


def write_outputs(folder: Path, res: dict, label: str) -> None:
    """Into ``folder``: robust.json (``res``), robust_curve.csv (every curve), robust_radius.csv,
    and the figures robust_radius.png (worst case against the radius) and robust_steps.png
    (Dice along the attack steps at the largest radius), as the report draws them."""
    from . import figures
    from .files import write_csv, write_json

    write_json(folder / "robust.json", res)
    rob = res["robust"]
    write_csv(folder / "robust_curve.csv", robust_curve_rows(rob))
    rows = radius_rows(res)
    write_csv(folder / "robust_radius.csv", rows)
    nan = lambda vs: [math.nan if v is None else v for v in vs]  # noqa: E731
    fig = figures.robust_radius([{"radius": r["radius"], **{f"{label}_{k}{s}": (r[k] if not s else math.nan)
                                                             for k in ("dice", "accuracy") for s in ("", "_std")}}
                                 for r in rows], [label],
                                f"{label}: worst case of {', '.join(rob['attacks'])} against the L-inf radius")
    figures.save(fig, folder / "robust_radius.png")
    top = radius_key(max(rob["radii"]))
    curves = {a: {label: {"steps": c[top]["steps"], "mean": nan(c[top]["dice"]), "lo": nan(c[top]["dice"]),
                          "hi": nan(c[top]["dice"])}} for a, c in rob["curves"].items()}
    figures.save(figures.robust_steps(curves, f"{label}: Dice along the attacks at eps {top}/255"),
                 folder / "robust_steps.png")


# --------------------------------------------------------------------------- the command
def _hdf5_chunks(path: str, split: str, size: int, tissues: list[str]) -> Iterator[Chunk]:
    from .data import iter_chunks

    for _, images, masks, names, bits in iter_chunks(path, split, size, channels=True):
        ids = torch.tensor([tissues.index(n.decode() if isinstance(n, bytes) else str(n)) for n in names])
        yield images, masks, bits, ids


def main(p: Params, source: str, data: str, weights: str | None = None, split: str = "test",
         attacks: list[str] | None = None, radii: list[float] | None = None, steps: int | None = None,
         out: str | None = None) -> dict:
    """``mlsys robust``: load, check, run the protocol in one MLflow run, write ``out``
    (default robust/<name>/) all at once. Returns the results written."""
    import mlflow

    from . import hardware, tracking
    from .data import SPLITS, split_of, split_tissues
    from .files import atomic_dir, file_md5
    from .params import section_dict, show_progress

    cfg = protocol(p.evaluate, attacks, radii, steps)
    name = default_name(source)
    folder = Path(out or Path("robust") / name)
    model, kind = load_model(source, weights)
    path = Path(data)
    if path.is_file():  # our HDF5 format
        if split not in SPLITS:
            raise InputError(f"--split {split!r} is not one of {list(SPLITS)}")
        n = len(split_of(data, split))
        if n == 0:
            raise InputError(f"{data} has no images in split {split!r}")
        tissues = split_tissues(data, split)
        first = next(_hdf5_chunks(data, split, 2, tissues))[0]
        net = attackable(model, first, f"model {source}")
        weights_cw, cw_source = train_class_weights(data, net.head.out_channels)
        chunks, fmt = _hdf5_chunks(data, split, cfg.attack.batch_size, tissues), "hdf5"
    elif path.is_dir():
        images, masks, _ = read_png_folder(path)
        n, tissues, fmt = len(images), [], "png"
        net = attackable(model, images[:2], f"model {source}")
        weights_cw, cw_source = None, "per-image inverse class frequency (fallback: a PNG folder has no training split)"
        chunks = tensor_chunks(images, masks, torch.zeros(n, dtype=torch.int64), cfg.attack.batch_size)
    else:
        raise InputError(f"DATA {data} does not exist; expected an HDF5 file (mlsys.data) or a folder with {PNG_LAYOUT}")
    params = {"robust.model": source, "robust.model_kind": kind, "robust.weights": weights or "",
              "robust.data": str(path.resolve()), "robust.data_format": fmt,
              "robust.split": split if fmt == "hdf5" else "", "robust.n_images": n,
              **{f"evaluate.robust.{k}": v for k, v in section_dict(cfg.robust).items()}}
    if weights:
        params["robust.weights_md5"] = file_md5(weights)
    with tracking.stage_run(f"robust {name}", params, p.tracking.experiment,
                            {"mlsys.stage": "robust", "mlsys.model": name}):
        mlflow.log_params(hardware.resolved_params("evaluate.attack",
                                                   hardware.resolve(cfg.attack, hardware.pick_device(cfg.device),
                                                                    bf16_on_cpu=False)))
        if fmt == "hdf5":
            tracking.log_dataset(path, "evaluation")
        with tracking.timed("compute"):
            res = run_protocol(net, chunks, n, cfg, tissues, weights_cw, cw_source, show_progress())
        res = {"model": source, "model_kind": kind, "data": str(path), "data_format": fmt,
               "split": split if fmt == "hdf5" else None, **res,
               "mlflow_run_id": mlflow.active_run().info.run_id, "machine": hardware.machine()}
        mlflow.log_metrics({f"clean/{m}": v for m, v in res["clean"].items() if v is not None})
        log_robust({**res["robust"], "paper_curve": NO_CURVE})
        cw = res["robust"].get("class_weights")
        mlflow.log_param("evaluate.robust.class_weights",
                         "per-image" if cw is None else "[" + ", ".join(f"{w:.6g}" for w in cw) + "]")
        with atomic_dir(folder) as tmp:  # all or nothing, in the folder and in the run
            write_outputs(tmp, res, name)
            mlflow.log_artifacts(str(tmp), "robust")
    print(f"mlsys robust {source}: clean accuracy {res['clean']['accuracy']:.4f} dice {_show(res['clean']['dice'])}"
          f" | worst case of {', '.join(cfg.robust.attacks)} ({cfg.robust.steps} steps): "
          + "; ".join(f"eps {k}/255 accuracy {_show(m['accuracy'])} dice {_show(m['dice'])}"
                      for k, m in res["robust"]["worst"].items()) + f" -> {folder}")
    return res


def _show(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
