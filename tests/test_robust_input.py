"""Bad input gets one clear line, exit status 2, no traceback and no partial output.

Every case runs the real command line (``mlsys.cli.main``, what ``python -m mlsys``
calls) in a fresh folder holding the bad input; a few run as real ``python -m mlsys``
processes too (traceback only with ``--debug``). The one-line messages are printed
(``pytest -rP``) so that the list of what each bad input produced can be read off.
"""
from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from mlsys import cli, data, prepare
from mlsys.model import build_model
from mlsys.params import DataParams, ModelParams
from mlsys.weights import save_weights

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"data": {"n_images": 18, "image_size": 16}, "model": {"base": 4, "depth": 2},
         "train": {"epochs": 1, "batch_size": 4, "device": "cpu"}, "tracking": {"log_model": False}}


# --------------------------------------------------------------------------- bad inputs
def fold(n: int = 9, size: int = 8):
    """Raw arrays in the PanNuke layout (images 0..255, instance-id masks, tissue names)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3)).astype(np.float64)
    masks = np.zeros((n, size, size, 6))
    masks[..., 5] = 1
    masks[:, 2:4, 2:4, 0], masks[:, 2:4, 2:4, 5] = 300, 0
    return images, masks, np.array(["Breast"] * n)


def write_fold(where: Path, images, masks, types, zipped: bool = False) -> Path:
    base = where / "Fold 2"
    for key, arr in (("images", images), ("masks", masks), ("types", types)):
        folder = base / ("masks" if key == "masks" else "images") / "fold2"
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(arr, bytes):
            (folder / f"{key}.npy").write_bytes(arr)
        else:
            np.save(folder / f"{key}.npy", arr, allow_pickle=True)
    if not zipped:
        return where
    out = where.with_suffix(".zip")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for f in sorted(base.rglob("*.npy")):
            z.write(f, str(f.relative_to(where)))
    return out


def pannuke(tmp: Path, **change) -> Path:
    """A PanNuke fold folder under ``tmp`` with some arrays replaced."""
    images, masks, types = fold()
    arrays = {"images": images, "masks": masks, "types": types, **change}
    return write_fold(tmp / "src", arrays["images"], arrays["masks"], arrays["types"])


def use_pannuke(tmp: Path, path) -> dict:
    return {"data": {"source": "pannuke", "pannuke_path": str(path)}}


def with_value(index, value, key="images"):
    def make(tmp: Path) -> dict:
        images, masks, types = fold()
        arr = {"images": images, "masks": masks}[key]
        arr[index] = value
        return use_pannuke(tmp, pannuke(tmp, **{key: arr}))
    return make


def truncated_npy(tmp: Path) -> dict:
    images, masks, types = fold()
    path = pannuke(tmp)
    f = path / "Fold 2/images/fold2/images.npy"
    f.write_bytes(f.read_bytes()[:-100])
    return use_pannuke(tmp, path)


def corrupt_zip_member(tmp: Path) -> dict:
    images, masks, types = fold()
    z = write_fold(tmp / "src", images, masks, types, zipped=True)
    raw = bytearray(z.read_bytes())
    at = raw.index(b"\x93NUMPY", raw.index(b"masks.npy")) + 600   # inside the masks' data
    raw[at:at + 8] = b"\x7f" * 8
    z.write_bytes(bytes(raw))
    return use_pannuke(tmp, z)


def empty_zip(tmp: Path) -> dict:
    z = tmp / "fold_2.zip"
    zipfile.ZipFile(z, "w").close()
    return use_pannuke(tmp, z)


def cut_zip(tmp: Path) -> dict:
    images, masks, types = fold()
    z = write_fold(tmp / "src", images, masks, types, zipped=True)
    z.write_bytes(z.read_bytes()[:2000])
    return use_pannuke(tmp, z)


def empty_folder(tmp: Path) -> dict:
    (tmp / "empty").mkdir()
    return use_pannuke(tmp, tmp / "empty")


PREPARE = [  # (case, make(tmp) -> params overrides, expected part of the message)
    ("pannuke_path empty", lambda t: {"data": {"source": "pannuke"}}, "data.pannuke_path is empty"),
    ("PanNuke path missing", lambda t: use_pannuke(t, t / "nowhere"), "does not exist"),
    ("PanNuke folder empty", empty_folder, "expected one images.npy of fold 2"),
    ("PanNuke zip empty", empty_zip, "expected one images.npy of fold 2"),
    ("PanNuke zip truncated", cut_zip, "is neither a folder nor a readable zip file"),
    ("PanNuke zip member corrupt", corrupt_zip_member, "corrupt zip file"),
    ("images rank 3", lambda t: use_pannuke(t, pannuke(t, images=fold()[0][..., 0])),
     "images.npy has shape (9, 8, 8); expected (N, H, H, 3)"),
    ("images 4 channels", lambda t: use_pannuke(t, pannuke(t, images=np.zeros((9, 8, 8, 4)))),
     "expected (N, H, H, 3)"),
    ("masks 5 channels", lambda t: use_pannuke(t, pannuke(t, masks=fold()[1][..., :5])),
     "masks.npy has shape (9, 8, 8, 5); expected (9, 8, 8, 6)"),
    ("masks count differs", lambda t: use_pannuke(t, pannuke(t, masks=fold()[1][:5])),
     "masks.npy has shape (5, 8, 8, 6); expected (9, 8, 8, 6) to match images.npy"),
    ("types count differs", lambda t: use_pannuke(t, pannuke(t, types=fold()[2][:4])),
     "types.npy has shape (4,); expected (9,)"),
    ("no images", lambda t: use_pannuke(t, pannuke(t, images=np.zeros((0, 8, 8, 3)),
                                                    masks=np.zeros((0, 8, 8, 6)), types=np.array([], "U6"))),
     "holds no images"),
    ("images dtype complex", lambda t: use_pannuke(t, pannuke(t, images=fold()[0].astype(np.complex64))),
     "images.npy has dtype complex64; expected numbers"),
    ("images dtype str", lambda t: use_pannuke(t, pannuke(t, images=fold()[0].astype("U3"))),
     "images.npy has dtype <U3"),
    ("masks dtype bool", lambda t: use_pannuke(t, pannuke(t, masks=fold()[1] > 0)),
     "masks.npy has dtype bool"),
    ("masks pickled objects", lambda t: use_pannuke(t, pannuke(t, masks=fold()[1].astype(object))),
     "holds Python objects (pickled); refusing to load it"),
    ("types dtype float", lambda t: use_pannuke(t, pannuke(t, types=np.zeros(9))),
     "types.npy has dtype float64; expected strings"),
    ("images.npy not npy", lambda t: use_pannuke(t, pannuke(t, images=b"not a numpy file" * 10)),
     "not a valid .npy file"),
    ("images.npy truncated", truncated_npy, "images.npy: truncated (expected 9 rows of shape (8, 8, 3))"),
    ("NaN pixel", with_value((3, 1, 1, 0), np.nan), "images hold NaN or infinite values"),
    ("infinite pixel", with_value((5, 0, 0, 2), np.inf), "images hold NaN or infinite values"),
    ("pixel above 255", with_value((0, 0, 0, 0), 300.0), "image values outside 0..255"),
    ("negative pixel", with_value((0, 0, 0, 0), -1.0), "image values outside 0..255"),
    ("negative mask id", with_value((4, 1, 1, 1), -3.0, "masks"), "non-negative whole instance ids"),
    ("fractional mask id", with_value((4, 1, 1, 1), 2.5, "masks"), "non-negative whole instance ids"),
    ("NaN mask id", with_value((4, 1, 1, 1), np.nan, "masks"), "non-negative whole instance ids"),
]

PARAMS = [
    ("negative eps", {"evaluate": {"attack": {"eps": -0.1}}},
     "params: evaluate.attack.eps = -0.1 is invalid; expected >= 0"),
    ("method1 steps 0", {"augment": {"method1": {"steps": 0}}}, "augment.method1.steps = 0 is invalid; expected >= 1"),
    ("split with a zero", {"data": {"split": [6, 1, 0]}}, "data.split = [6, 1, 0] is invalid"),
    ("split of two", {"data": {"split": [6, 1]}}, "expected three positive ratios train:valid:test"),
    ("split negative", {"data": {"split": [6, -1, 2]}}, "data.split = [6, -1, 2] is invalid"),
    ("split too fine for the data", {"data": {"n_images": 4, "split": [6, 1, 2]}},
     "params: data.split = [6, 1, 2] needs at least 9 images for one image per split; the data hold 4"),
    ("image size the U-Net cannot pool", {"data": {"image_size": 20}, "model": {"depth": 3}},
     "data.image_size = 20 is invalid; expected a positive multiple of 2**model.depth = 8"),
    ("target class outside", {"evaluate": {"attack": {"target": 6}}}, "evaluate.attack.target = 6"),
    ("epochs a string", {"train": {"epochs": "ten"}}, "train.epochs = 'ten' is invalid; expected an integer"),
    ("amp not a bool", {"train": {"amp": "yes"}}, "train.amp = 'yes' is invalid; expected true or false"),
    ("lr zero", {"train": {"lr": 0}}, "train.lr = 0.0 is invalid; expected > 0"),
    ("dropout 1", {"model": {"dropout": 1.0}}, "model.dropout = 1.0 is invalid"),
    ("unknown key", {"train": {"epoch": 3}}, "unknown key train.epoch"),
    ("unknown device", {"train": {"device": "gpu"}}, "train.device = 'gpu' is invalid"),
    ("section not a mapping", {"train": [1, 2]}, "params: train must be a mapping, got list"),
    ("unknown source", {"data": {"source": "kaggle"}}, "data.source = 'kaggle' is invalid"),
    ("paper threshold 1", {"evaluate": {"paper_threshold": 1.5}}, "evaluate.paper_threshold = 1.5"),
]

# Choices checked by the code that uses them (each stage checks its own when it starts;
# `mlsys check` runs every stage's check up front, as `make repro` does first)
CHOICES = [
    ("unknown score", {"augment": {"method2": {"score": "l2"}}}, "augment.method2.score = 'l2' is invalid"),
    ("unknown select", {"augment": {"method2": {"select": "best"}}}, "augment.method2.select = 'best'"),
    ("unknown search", {"augment": {"method2": {"search": "greedy"}}}, "augment.method2.search = 'greedy'"),
    ("unknown attack mode", {"evaluate": {"attack": {"mode": "fgsm"}}},
     "evaluate.attack.mode = 'fgsm' is invalid; expected one of ['faithful', 'standard']"),
    ("unknown method-one mode", {"augment": {"method1": {"mode": "fgsm"}}}, "augment.method1.mode = 'fgsm'"),
    ("unknown robust attack", {"evaluate": {"robust": {"attacks": ["segpgd", "fab"]}}},
     "evaluate.robust.attacks = ['segpgd', 'fab'] is invalid; expected distinct names of ['pgd'"),
    ("unknown variant", {"model": {"variant": "keras"}}, "model.variant = 'keras' is invalid"),
]


# --------------------------------------------------------------------------- harness
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store for the module's cases (creating a SQLite store takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def project(tmp_path, monkeypatch, store):
    """A fresh project folder (dvc.yaml marks the root) as the working directory."""
    work = tmp_path / "project"
    work.mkdir()
    (work / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLSYS_PROGRESS", "0")
    monkeypatch.delenv("MLSYS_DEBUG", raising=False)
    return work


def write_params(work: Path, overrides: dict) -> None:
    from micro import merge

    params = merge(yaml.safe_load(yaml.safe_dump(SMALL)), overrides)
    (work / "params.yaml").write_text(yaml.safe_dump(params))


def outputs(work: Path) -> list[str]:
    """Files a stage could have left (everything but inputs and the MLflow store)."""
    skip = ("params.yaml", "dvc.yaml", "src", "empty", "fold_2.zip", "src.zip", "mlartifacts", "checkpoints")
    return sorted(str(p.relative_to(work)) for p in work.rglob("*")
                  if p.is_file() and not str(p.relative_to(work)).startswith(skip))


def expect_error(capsys, work: Path, argv: list[str], expected: str, before: list[str] | None = None) -> str:
    earlier = capsys.readouterr().out   # keep the lines printed for earlier cases of the test
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    print(f"{earlier}{' '.join(argv)} -> exit {code}: {err.strip()}")
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"mlsys {argv[0]}: error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert outputs(work) == (before or []), "no partial output"
    return lines[0]


@pytest.mark.parametrize("case,make,expected", PREPARE, ids=[c[0] for c in PREPARE])
def test_bad_pannuke_input(project, capsys, case, make, expected):
    write_params(project, make(project))
    expect_error(capsys, project, ["prepare"], expected)


@pytest.mark.parametrize("case,overrides,expected", PARAMS, ids=[c[0] for c in PARAMS])
def test_bad_params(project, capsys, case, overrides, expected):
    write_params(project, overrides)
    expect_error(capsys, project, ["prepare"], expected)


@pytest.mark.parametrize("case,overrides,expected", CHOICES, ids=[c[0] for c in CHOICES])
def test_bad_choices_fail_the_check(project, capsys, case, overrides, expected):
    write_params(project, overrides)
    expect_error(capsys, project, ["check"], expected)


def test_debug_env_shows_the_traceback(project, capsys, monkeypatch):
    write_params(project, {"train": {"epochs": 0}})
    monkeypatch.setenv("MLSYS_DEBUG", "1")
    assert cli.main(["prepare"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ParamsError" in err and err.strip().endswith("expected >= 1")


def test_params_file_not_yaml(project, capsys):
    (project / "params.yaml").write_text("train: [epochs: 3\n")
    expect_error(capsys, project, ["prepare"], "params: params.yaml is not valid YAML")


# --------------------------------------------------------------------------- HDF5 and data the stages read
@pytest.fixture
def prepared(project):
    """The project with a small, valid data/clean.h5."""
    write_params(project, {})
    cfg = DataParams(n_images=18, image_size=16)
    prepare.prepare(cfg, project / "data/clean.h5", progress=False)
    return project


def h5_edit(path: Path, edit) -> None:
    with h5py.File(path, "r+") as f:
        edit(f)


def _replace(name, value):
    def edit(f):
        del f[name]
        f[name] = value
    return edit


def _in_train(name, value):
    """Set one value of the first training image (what `train` reads)."""
    def edit(f):
        first = int(f["split/train"][0])
        f[name][(first,) + (0,) * (f[name].ndim - 1)] = value
    return lambda p: h5_edit(p, edit)


H5 = [
    ("clean.h5 missing", lambda p: p.unlink(), "data/clean.h5 does not exist; it is made by the prepare stage"),
    ("clean.h5 truncated", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 3]),
     "dataset data/clean.h5 is not a readable HDF5 file"),
    ("clean.h5 garbage", lambda p: p.write_bytes(b"\0garbage" * 1000), "is not a readable HDF5 file"),
    ("no masks", lambda p: h5_edit(p, lambda f: f.__delitem__("masks")), "has no 'masks'"),
    ("no test split", lambda p: h5_edit(p, lambda f: f.__delitem__("split/test")), "has no 'split/test'"),
    ("masks of another size", lambda p: h5_edit(p, _replace("masks", np.zeros((18, 8, 8), np.uint8))),
     "masks are uint8 (18, 8, 8); expected uint8 (18, 16, 16) to match the images"),
    ("images float64", lambda p: h5_edit(p, _replace("images", np.zeros((18, 3, 16, 16)))),
     "images are float64 (18, 3, 16, 16); expected float32 (N, 3, H, W)"),
    ("split index outside", lambda p: h5_edit(p, _replace("split/train", np.array([0, 99]))),
     "split/train must hold image indices in 0..17"),
    ("mask class 9", _in_train("masks", 9), "masks must hold class ids 0..5, found 9"),
    ("NaN in images", _in_train("images", np.nan), "images must be finite values in [0, 1]"),
]


@pytest.mark.parametrize("case,damage,expected", H5, ids=[c[0] for c in H5])
def test_bad_dataset_file(prepared, capsys, case, damage, expected):
    damage(prepared / "data/clean.h5")
    expect_error(capsys, prepared, ["train", "model1"], expected, outputs(prepared))


TRAIN = [
    ("batch larger than the data", {"train": {"batch_size": 64}},
     "params: train.batch_size = 64 is invalid; expected at most the 12 training images"),
    ("fewer classes than the masks", {"model": {"n_classes": 3}}, "model.n_classes = 3 is invalid; the masks hold"),
    ("no such GPU", {"train": {"device": "cuda:3"}}, "device 'cuda:3' (train.device / augment.device) is not available"),
]


@pytest.mark.parametrize("case,overrides,expected", TRAIN, ids=[c[0] for c in TRAIN])
def test_bad_training_settings(prepared, capsys, case, overrides, expected):
    if case == "no such GPU" and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    write_params(prepared, overrides)
    expect_error(capsys, prepared, ["train", "model1"], expected, outputs(prepared))


def test_pannuke_image_size_the_unet_cannot_pool(project, capsys):
    """PanNuke sets the image size, not data.image_size: a 12-pixel fold and a depth-3 U-Net."""
    images, masks, types = fold(n=9, size=12)
    write_params(project, {**use_pannuke(project, write_fold(project / "src", images, masks, types)),
                           "model": {"depth": 3}, "train": {"batch_size": 2}})
    assert cli.main(["prepare"]) == 0
    expect_error(capsys, project, ["train", "model1"],
                 "params: model.depth = 3 cannot pool the 12x12 images", outputs(project))


# --------------------------------------------------------------------------- checkpoints
class Evil:
    """Unpickling this creates a file: loading a checkpoint must never get that far."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def weights_cases(tmp: Path):
    yield ("another class count", lambda p: save_weights(build_model(ModelParams(base=4, depth=2, n_classes=4)),
                                                          ModelParams(base=4, depth=2, n_classes=4), p),
           "were trained with model.n_classes = 4, params.yaml says 6; retrain or match the params")
    yield ("another width", lambda p: save_weights(build_model(ModelParams(base=8, depth=2)),
                                                    ModelParams(base=8, depth=2), p), "differs in ['base']")
    yield ("another architecture", lambda p: torch.save({"state_dict": torch.nn.Linear(3, 2).state_dict()}, p),
           "do not fit the U-Net of the params: 30 tensors differ (e.g. missing down.0.0.weight)")
    yield ("not a weights file", lambda p: torch.save([1, 2, 3], p), "are not an mlsys weights file")
    yield ("garbage bytes", lambda p: p.write_bytes(b"\x80\x02garbage"), "cannot be loaded safely")
    small = ModelParams(base=4, depth=2)
    yield ("truncated", lambda p: (save_weights(build_model(small), small, p), p.write_bytes(p.read_bytes()[:3000])),
           "not a readable torch file")
    evil = pickle.dumps({"state_dict": Evil(tmp / "pwned")}, protocol=2)
    yield ("malicious pickle", lambda p: p.write_bytes(evil),
           "it holds more than tensors (Unsupported global: GLOBAL io.open was not an allowed global by "
           "default); refusing to unpickle it")


def test_bad_weights_files(project, capsys):
    write_params(project, {})
    weights = project / "models/seed0/model1.pt"
    for case, make, expected in weights_cases(project.parent):
        weights.parent.mkdir(parents=True, exist_ok=True)
        make(weights)
        msg = expect_error(capsys, project, ["evaluate", "model1"], expected, outputs(project))
        assert "models/seed0/model1.pt" in msg, case
        weights.unlink()
    assert not (project.parent / "pwned").exists(), "unpickling ran code"


def test_malicious_training_checkpoint_is_refused(prepared, capsys):
    """The resume path (checkpoints/<model>.pt) loads with weights_only too."""
    marker = prepared.parent / "pwned-checkpoint"
    ckpt = prepared / "checkpoints/seed0/model1.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(pickle.dumps({"model": Evil(marker)}, protocol=2))
    expect_error(capsys, prepared, ["train", "model1"], "checkpoint checkpoints/seed0/model1.pt cannot be loaded safely: "
                 "it holds more than tensors (Unsupported global: GLOBAL io.open",
                 outputs(prepared))
    assert not marker.exists()


# --------------------------------------------------------------------------- tracking server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_is_named_without_credentials(prepared, capsys, monkeypatch):
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cr3t-pw@127.0.0.1:{port}")
    msg = expect_error(capsys, prepared, ["train", "model1"],
                       f"MLflow tracking server http://127.0.0.1:{port} is unreachable", outputs(prepared))
    assert "s3cr3t" not in msg and "alice" not in msg


# --------------------------------------------------------------------------- real processes
def mlsys(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MLSYS_"))}
    full.update(PYTHONPATH=str(ROOT), MLSYS_PROGRESS="0", **env)
    return subprocess.run([sys.executable, "-m", "mlsys", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=300)


def test_processes_exit_2_with_one_line_and_debug_shows_the_traceback(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    images, masks, types = fold()
    images[2, 3, 3, 1] = np.nan
    write_fold(tmp_path / "src", images, masks, types)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"data": {"source": "pannuke", "pannuke_path": str(tmp_path / "src")}}))
    out = mlsys(tmp_path, "prepare")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("mlsys prepare: error: ") and "images hold NaN or infinite values" in out.stderr
    assert not (tmp_path / "data/clean.h5").exists() and not list((tmp_path / "data").glob(".*"))
    out = mlsys(tmp_path, "--debug", "prepare")
    assert out.returncode == 2 and "Traceback" in out.stderr and "DataError" in out.stderr

    port = free_port()
    out = mlsys(tmp_path, "compare", MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}")
    assert out.returncode == 2 and out.stderr.strip() == (
        f"mlsys compare: error: MLflow tracking server http://127.0.0.1:{port} is unreachable "
        "(Connection refused); start it or set MLFLOW_TRACKING_URI to a reachable server")
