"""`mlsys robust MODEL DATA` (mlsys/robust_eval.py): the field's protocol on models that are not
ours -- a small FCN written here, from a TorchScript file and from module:function + weights --
on our HDF5 format and on a PNG folder, and on the champion of a real MLflow registry; bad
input is one line, exit status 2 and nothing in --out."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mlsys import cli, prepare, robust_eval, tracking
from mlsys.data import load_split, split_tissues
from mlsys.evaluate import train_class_weights
from mlsys.model import UNet
from mlsys.params import DataParams, InputError

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
ROOT = Path(__file__).resolve().parents[1]
# the smallest protocol that still runs a step-dependent attack and SEA's three losses
FLAGS = ["--attacks", "segpgd,sea", "--radii", "8", "--steps", "1"]


class TinyFCN(nn.Module):
    """A foreign architecture: no pooling, a dilated conv and batch norm (whose eval mode matters)."""

    def __init__(self, n_classes: int = 6, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=stride), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.ReLU())
        self.classifier = nn.Conv2d(8, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


def small_fcn() -> nn.Module:  # MODEL test_robust_cli:small_fcn (tests/ is on sys.path)
    return TinyFCN()


def three_class_fcn() -> nn.Module:
    return TinyFCN(n_classes=3)


def strided_fcn() -> nn.Module:  # logits at half the images' size
    return TinyFCN(stride=2)


def not_a_module():
    return "fcn"


def broken():
    raise KeyError("no such backbone")


def trained(model: nn.Module, h5: Path, steps: int = 30) -> nn.Module:
    """``model`` fitted briefly to the training split (a model the attacks can hurt; its batch
    norm's running statistics differ from any batch's own, so train mode would change it)."""
    images, masks = load_split(h5, "train")
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(images), masks).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The data (an HDF5 file of 16x16 patches and a PNG folder of its test split) and the FCN
    as a TorchScript file and as a state_dict."""
    tmp = tmp_path_factory.mktemp("robust")
    h5 = tmp / "clean.h5"
    prepare.prepare(DataParams(n_images=18, image_size=16), h5, progress=False)
    images, masks = load_split(h5, "test")
    png = tmp / "png"
    write_png(png, images, masks)
    fcn = trained(TinyFCN(), h5)
    torch.jit.script(fcn).save(str(tmp / "fcn.pt"))
    torch.save(fcn.state_dict(), tmp / "fcn_state.pth")
    return {"h5": h5, "png": png, "pt": tmp / "fcn.pt", "state": tmp / "fcn_state.pth", "tmp": tmp}


def write_png(folder: Path, images: torch.Tensor, masks: torch.Tensor) -> None:
    """The documented layout: images/<stem>.png 8-bit RGB, masks/<stem>.png class ids (L)."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rgb = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for i, (x, y) in enumerate(zip(rgb, masks.numpy().astype(np.uint8))):
        Image.fromarray(x, "RGB").save(folder / "images" / f"patch{i:02d}.png")
        Image.fromarray(y, "L").save(folder / "masks" / f"patch{i:02d}.png")


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """An empty MLflow store (SQLite) in tmp_path, the working folder (artifacts beside it)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def robust(capsys, *args: str) -> tuple[int, str, str]:
    """``mlsys robust ARGS`` in this process: (exit status, stdout, stderr)."""
    code = cli.main(["--params", str(ROOT / "params.yaml"), "robust", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def check_written(out: Path, tissues: bool) -> dict:
    """The results folder: the JSON laid out as the evaluate stage's robust section, the CSVs and
    figures; the MLflow run FINISHED with the worst-case metrics and the folder as artifacts."""
    assert sorted(p.name for p in out.iterdir()) == ["robust.json", "robust_curve.csv", "robust_radius.csv",
                                                    "robust_radius.png", "robust_steps.png"]
    res = json.loads((out / "robust.json").read_text())
    rob = res["robust"]
    assert rob["radii"] == [8.0] and rob["attacks"] == ["segpgd", "sea"]
    assert set(rob["worst"]) == {"8"} and set(rob["per_attack"]) == {"segpgd", "sea"}
    assert set(rob["curves"]) == {"segpgd", "sea", "worst"} and rob["curves"]["worst"]["8"]["steps"] == [0, 1]
    assert rob["worst_miou"]["8"]["candidates"] == ["segpgd", "sea/mask-ce-bal", "sea/mask-ce", "sea/js"]
    assert (set(rob["tissue"]) != set()) == tissues
    assert 0 <= rob["worst"]["8"]["accuracy"] <= res["clean"]["accuracy"] <= 1
    run = mlflow.get_run(res["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["mlsys.stage"] == "robust"
    assert run.data.metrics["robust/eps8/accuracy"] == rob["worst"]["8"]["accuracy"]
    assert run.data.params["evaluate.robust.attacks"] == "['segpgd', 'sea']"
    logged = {Path(a.path).name for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "robust")}
    assert "robust.json" in logged and "robust_steps.png" in logged
    return res


def test_foreign_fcn_from_torchscript_and_from_module_function_on_hdf5_and_png(files, store, capsys):
    """The same FCN loaded two ways gives the same numbers, on each data format; the HDF5 run
    has per-tissue metrics and SEA's class weights from the training split, and equals
    evaluate_model on the same tensors (the notebook function)."""
    results = {}
    for how, model in (("script", [files["pt"]]),
                       ("function", ["test_robust_cli:small_fcn", "--weights", files["state"]])):
        for fmt in ("h5", "png"):
            out = store / f"out-{how}-{fmt}"
            code, stdout, err = robust(capsys, *model, files[fmt], "--out", out, *FLAGS)
            assert code == 0, err
            assert "worst case of segpgd, sea" in stdout
            results[how, fmt] = check_written(out, tissues=fmt == "h5")
    for fmt in ("h5", "png"):
        assert results["script", fmt]["robust"] == results["function", fmt]["robust"]
    h5 = results["script", "h5"]
    assert h5["model_kind"] == "torchscript" and results["function", "h5"]["model_kind"] == "module:function"
    assert h5["robust"]["class_weights_source"].startswith("inverse pixel frequency of the train split")
    assert results["script", "png"]["robust"]["class_weights"] is None
    assert h5["robust"]["worst"]["8"]["accuracy"] < h5["clean"]["accuracy"]  # the attacks hurt it

    images, masks, bits = load_split(files["h5"], "test", channels=True)
    with h5py.File(files["h5"], "r") as f:
        names = f["tissue"].asstr()[:][f["split/test"][:]].tolist()
    weights, _ = train_class_weights(str(files["h5"]), 6)
    fcn = TinyFCN()
    fcn.load_state_dict(torch.load(files["state"], weights_only=True))
    mine = robust_eval.evaluate_model(fcn, images, masks, attacks=["segpgd", "sea"], radii=[8], steps=1,
                                      tissues=names, class_weights=weights, channels=bits)
    assert sorted(mine["robust"]["tissue"]) == split_tissues(files["h5"], "test")
    # bit for bit but the class-weight source's wording (given here, counted from the file there)
    assert {**mine["robust"], "class_weights_source": ""} == {**h5["robust"], "class_weights_source": ""}
    assert mine["clean"]["accuracy"] == h5["clean"]["accuracy"]


def test_champion_from_the_registry_is_attacked_at_any_size(files, store, capsys):
    """The registry's U-Net is a torch.export program (tracking.log_model): it refuses train()
    and eval(), yet `mlsys robust models:/mlsys-unet@champion` attacks it, at the size it was
    logged with and at another one, computing what the U-Net computes; a size the U-Net cannot
    take is refused in one line that says why."""
    torch.manual_seed(0)
    unet = UNet(n_classes=6, base=4, depth=2).eval()
    images, masks = load_split(files["h5"], "test")
    tracking.setup("mlsys")
    with mlflow.start_run():
        info = tracking.log_model(unet, images[:2])
    client = mlflow.MlflowClient()
    version = mlflow.register_model(info.model_uri, tracking.REGISTERED_MODEL)
    client.set_registered_model_alias(tracking.REGISTERED_MODEL, tracking.CHAMPION_ALIAS, version.version)

    code, stdout, err = robust(capsys, "models:/mlsys-unet@champion", files["h5"], *FLAGS)
    assert code == 0, err
    res = check_written(store / "robust" / "mlsys-unet-champion", tissues=True)
    assert res["model_kind"] == "mlflow"
    weights, _ = train_class_weights(str(files["h5"]), 6)
    direct = robust_eval.evaluate_model(unet, images, masks, attacks=["segpgd", "sea"], radii=[8], steps=1,
                                        class_weights=weights, channels=load_split(files["h5"], "test", True)[2])
    assert direct["robust"]["worst"] == res["robust"]["worst"]  # the exported program computes what the U-Net does

    side = images.shape[-1] // 2  # another size than the logged one, still divisible by 2**depth
    assert side % 4 == 0 and side != images.shape[-1]
    small = store / "png-small"
    write_png(small, images[:, :, :side, :side], masks[:, :side, :side])
    out = store / "out-small"
    code, _, err = robust(capsys, "models:/mlsys-unet@champion", small, "--out", out, *FLAGS)
    assert code == 0, err
    res = check_written(out, tissues=False)
    direct = robust_eval.evaluate_model(unet, *robust_eval.read_png_folder(small)[:2], attacks=["segpgd", "sea"],
                                        radii=[8], steps=1)
    assert direct["robust"]["worst"] == res["robust"]["worst"]

    odd = store / "png-odd"
    write_png(odd, images[:, :, :side + 2, :side + 2], masks[:, :side + 2, :side + 2])
    out = store / "out-odd"
    code, _, err = robust(capsys, "models:/mlsys-unet@champion", odd, "--out", out, *FLAGS)
    line = one_line(code, err, out)
    assert f"(2, 3, {side + 2}, {side + 2})" in line and "torch.export program" in line, line


def one_line(code: int, err: str, out: Path) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, err)
    assert lines[0].startswith("mlsys robust: error: "), lines[0]
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp*")), f"{out} left behind"
    return lines[0]


def test_bad_input_is_one_line_and_leaves_nothing(files, store, capsys):
    tmp = store
    (tmp / "garbage.pt").write_bytes(b"not a model")
    (tmp / "garbage.pt2").write_bytes(b"not a program")
    many = tmp / "png-ids"  # a mask with class id 5 for a 3-class model
    write_png(many, torch.rand(2, 3, 8, 8), torch.tensor([[[5] * 8] * 8, [[0] * 8] * 8]))
    bright = tmp / "bright.h5"
    bright.write_bytes(files["h5"].read_bytes())
    with h5py.File(bright, "r+") as f:
        f["images"][:, 0, 0, 0] = 1.5
    state = ["--weights", files["state"]]
    cases = {
        "strided": (["test_robust_cli:strided_fcn", *state, files["h5"]], "expected logits (N, C, H, W) = (2, C, 16, 16)"),
        "classes": (["test_robust_cli:three_class_fcn", "--weights", tmp / "three.pth", many], "class ids 0..5"),
        "range": ([files["pt"], bright], "[0, 1]"),
        "unreadable": ([tmp / "garbage.pt"], "is not a TorchScript file"),
        "unreadable-pt2": ([tmp / "garbage.pt2"], "is not a loadable torch.export program"),
        "missing-model": ([tmp / "none.pt"], "does not exist"),
        "no-weights": (["test_robust_cli:small_fcn", files["h5"]], "needs --weights"),
        "not-a-module": (["test_robust_cli:not_a_module", *state, files["h5"]], "not a torch.nn.Module"),
        "broken": (["test_robust_cli:broken", *state, files["h5"]], "broken() failed: 'no such backbone'"),
        "wrong-weights": (["test_robust_cli:three_class_fcn", *state, files["h5"]], "do not fit"),
        "no-data": ([files["pt"], tmp / "nowhere"], "does not exist"),
        "attack": ([files["pt"], files["h5"], "--attacks", "segpgd,fgsm"], "evaluate.robust.attacks"),
        "radius": ([files["pt"], files["h5"], "--radii", "8,x"], "--radii"),
    }
    torch.save(TinyFCN(n_classes=3).state_dict(), tmp / "three.pth")
    for name, (args, expected) in cases.items():
        if len(args) == 1 or name == "unreadable-pt2":
            args = [*args, files["h5"]]
        out = tmp / "out" / name
        code, _, err = robust(capsys, *FLAGS, "--out", out, *args)  # the case's own flags win
        line = one_line(code, err, out)
        assert expected in line, (name, line)


def test_notebook_function_checks_its_tensors(files):
    images, masks = load_split(files["h5"], "test")
    fcn = trained(TinyFCN(), files["h5"], steps=5)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        robust_eval.evaluate_model(fcn, images * 255, masks, attacks=["segpgd"], radii=[8], steps=1)
    with pytest.raises(InputError, match="class ids"):
        robust_eval.evaluate_model(TinyFCN(n_classes=3).eval(), images, masks, attacks=["segpgd"], radii=[8],
                                   steps=1)
    res = robust_eval.evaluate_model(fcn, images, masks, attacks=["segpgd"], radii=[8], steps=1)
    assert res["n_images"] == len(images) and res["robust"]["tissue"] == {}
    assert not fcn.training  # the model ran, and stays, in inference mode
