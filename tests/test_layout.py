"""The layout of the project agrees with itself: dvc.yaml's stages list the code they execute
(derived from the imports), the model list and every path match mlsys.params / mlsys.paths,
bad input ends in one line and exit status 2 leaving nothing behind, and an edit of csrc/
makes method two refuse the stale native build."""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import micro
from mlsys import paths
from mlsys.params import METHODS, MODELS

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mlsys"
JOB_WORDS = {"prepare", "train", "augment", "evaluate", "report"}


# --------------------------------------------------------------------------- dvc.yaml, expanded
def expand_stages(dvc_text: str, seeds: list[int]) -> dict[str, dict]:
    """dvc.yaml's stages with ``foreach: ${seeds}`` expanded: {"train-model1@0": {cmd, deps,
    outs, metrics, params}}, ``${item}`` replaced by the seed; outs/metrics as plain paths."""

    def fill(value, item):
        if isinstance(value, str):
            return value.replace("${item}", str(item))
        if isinstance(value, list):
            return [fill(v, item) for v in value]
        if isinstance(value, dict):
            return {fill(k, item): fill(v, item) for k, v in value.items()}
        return value

    def plain(entries):  # "path" or {"path": {"cache": false}} -> "path"
        return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]

    out = {}
    for name, stage in yaml.safe_load(dvc_text)["stages"].items():
        if "foreach" in stage:
            assert stage["foreach"] == "${seeds}", f"stage {name}: foreach {stage['foreach']!r}, expected ${{seeds}}"
            items = [(f"{name}@{s}", fill(stage["do"], s)) for s in seeds]
        else:
            items = [(name, stage)]
        for full, body in items:
            out[full] = {"cmd": body["cmd"], "deps": list(body.get("deps") or []), "params": body.get("params") or [],
                         "outs": plain(body.get("outs")), "metrics": plain(body.get("metrics"))}
    return out


def seeds() -> list[int]:
    return yaml.safe_load((ROOT / "params.yaml").read_text())["seeds"]


def stages() -> dict[str, dict]:
    return expand_stages((ROOT / "dvc.yaml").read_text(), seeds())


# --------------------------------------------------------------------------- imports, from the code
def _mlsys_modules(nodes) -> set[str]:
    """Names of the mlsys modules (files mlsys/<name>.py) imported anywhere inside ``nodes``
    (also inside functions): ``from . import x``, ``from .x import y``, ``import mlsys.x``,
    ``from mlsys import x``, ``from mlsys.x import y``. The compiled mlsys._C is no file here."""
    found = set()
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or (node.level == 0 and node.module == "mlsys"):
                base = node.module if node.level == 1 else None
                if base is None:
                    found.update(a.name for a in node.names)
                else:
                    found.add(base.split(".")[0])
            elif node.level == 0 and (node.module or "").startswith("mlsys."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("mlsys."))
    return {m for m in found if (PKG / f"{m}.py").is_file()}


def _tree(module: str) -> ast.Module:
    return ast.parse((PKG / f"{module}.py").read_text(), filename=f"mlsys/{module}.py")


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def cli_nodes() -> list[ast.AST]:
    """What every stage executes of cli.py: its module level and ``main()`` / ``build_parser()``
    (the ``cmd_*`` functions only dispatch to the job modules, each stage to its own)."""
    tree = _tree("cli")
    fns = _functions(tree)
    top = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return top + [fns["main"], fns["build_parser"]]


def job_modules(job: str) -> set[str]:
    """The module(s) ``mlsys <job>`` dispatches to: what COMMANDS[job] (cli.py) imports."""
    tree = _tree("cli")
    commands = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "COMMANDS" for t in n.targets))
    by_word = {k.value: v.id for k, v in zip(commands.keys, commands.values)}
    assert job in by_word, f"cli.py COMMANDS has no {job!r}"
    mods = _mlsys_modules([_functions(tree)[by_word[job]]])
    assert mods, f"cli.py {by_word[job]} imports no mlsys module"
    return mods


def executed_modules(job: str) -> set[str]:
    """The import closure of ``python -m mlsys <job>``: __main__, cli (as :func:`cli_nodes`)
    and the job module, each followed through everything it imports."""
    todo, seen = ["__main__", "cli", *sorted(job_modules(job))], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(_mlsys_modules(cli_nodes() if m == "cli" else [_tree(m)]) - seen)
    return seen


def _covers(dep: str, path: str) -> bool:
    return path == dep or path.startswith(dep.rstrip("/") + "/")


def missing_code_deps(all_stages: dict[str, dict]) -> list[str]:
    """One line per (stage, executed module file) that the stage's deps do not list."""
    missing, cache = [], {}
    for name, st in all_stages.items():
        words = st["cmd"].split()
        assert words[0] == "bin/mlsys" and words[1] in JOB_WORDS, f"stage {name}: cmd {st['cmd']!r}"
        if words[1] not in cache:
            cache[words[1]] = executed_modules(words[1])
        for m in sorted(cache[words[1]]):
            path = f"mlsys/{m}.py"
            if not any(_covers(d, path) for d in st["deps"]):
                missing.append(f"stage {name} executes {path} but does not depend on it")
    return missing


def test_import_closure_sees_function_level_imports():
    # evaluate imports figures/tracking only inside a function; augment reaches ops and _build
    assert {"figures", "tracking", "paths", "train"} <= executed_modules("evaluate")
    assert {"ops", "_build", "augment"} <= executed_modules("augment")
    assert "report" not in executed_modules("prepare")  # cmd_report is not executed by `mlsys prepare`


def test_stages_depend_on_the_code_they_execute():
    all_stages = stages()
    assert set(all_stages) == micro.stages(seeds()), "dvc.yaml's stages are not those of mlsys.paths.stage_name"
    missing = missing_code_deps(all_stages)
    assert not missing, "\n".join(missing)
    for s in seeds():
        deps = all_stages[paths.stage_name("augment", "method2", s)]["deps"]
        assert "csrc" in deps and "setup.py" in deps, f"augment-method2@{s} must depend on csrc and setup.py"


def test_missing_dep_is_reported():
    """The check names the stage and the module when one dep is missing."""
    all_stages = stages()
    name = paths.stage_name("evaluate", "model2", seeds()[0])
    all_stages[name]["deps"].remove("mlsys/tracking.py")
    assert missing_code_deps(all_stages) == [f"stage {name} executes mlsys/tracking.py but does not depend on it"]


# --------------------------------------------------------------------------- models and paths
def _groups(all_stages: dict, job: str) -> set[str]:
    return {n.split("@")[0][len(job) + 1:] for n in all_stages if n.startswith(f"{job}-")}


def test_models_and_paths_agree_with_dvc_yaml():
    all_stages = stages()
    assert _groups(all_stages, "train") == set(MODELS)
    assert _groups(all_stages, "evaluate") == set(MODELS)
    assert _groups(all_stages, "augment") == set(METHODS)
    prep = all_stages["prepare"]
    assert prep["outs"] == [paths.CLEAN] and prep["metrics"] == []
    rep = all_stages["report"]
    assert set(rep["outs"]) == {paths.REPORT, paths.REPORT_PLOTS} and rep["metrics"] == [paths.REPORT_METRICS]

    def data_deps(st):
        return {d for d in st["deps"] if d.startswith(("data/", "models/"))}

    for s in seeds():
        for m, sets in MODELS.items():
            st = all_stages[paths.stage_name("train", m, s)]
            # the training sets of MODELS, plus the clean data's validation split (train.py)
            assert data_deps(st) == {paths.dataset(n, s) for n in sets} | {paths.CLEAN}, f"train-{m}@{s}"
            assert set(st["outs"]) == {paths.weights(m, s), paths.train_plot(m, s)}, f"train-{m}@{s}"
            assert st["metrics"] == [paths.train_metrics(m, s)], f"train-{m}@{s}"
            st = all_stages[paths.stage_name("evaluate", m, s)]
            assert data_deps(st) == {paths.CLEAN, paths.weights(m, s)}, f"evaluate-{m}@{s}"
            assert st["outs"] == [paths.eval_figures(m, s)], f"evaluate-{m}@{s}"
            assert st["metrics"] == [paths.eval_metrics(m, s)], f"evaluate-{m}@{s}"
        for method in METHODS:
            st = all_stages[paths.stage_name("augment", method, s)]
            assert data_deps(st) == {paths.CLEAN, paths.weights("model1", s)}, f"augment-{method}@{s}"
            assert st["outs"] == [paths.dataset(method, s)], f"augment-{method}@{s}"
            assert st["metrics"] == [paths.augment_metrics(method, s)], f"augment-{method}@{s}"


# --------------------------------------------------------------------------- bad input: one line, exit 2
def micro_folder(folder: Path, over: dict | None = None) -> Path:
    """A folder holding only a micro params.yaml (tracking.repo_root falls back to it)."""
    folder.mkdir(parents=True)
    params = micro.merge(yaml.safe_load((ROOT / "params.yaml").read_text()), json.loads(json.dumps(micro.MICRO)))
    (folder / "params.yaml").write_text(yaml.safe_dump(micro.merge(params, over or {})))
    return folder


def write_fold(folder: Path, n: int, nan: bool = False, size: int = 8) -> Path:
    """A PanNuke-layout fold 2 (``Fold 2/images/fold2/{images,types}.npy``,
    ``Fold 2/masks/fold2/masks.npy``) of ``n`` images, valid unless ``nan`` (one NaN pixel)."""
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (n, size, size, 3)).astype(np.float64)
    if nan:
        images[n // 2, 1, 1, 0] = np.nan
    masks = np.zeros((n, size, size, 6))
    masks[:, 2:4, 2:4, 0] = 7.0  # one neoplastic nucleus each
    base = folder / "Fold 2"
    for sub, arrays in (("images", {"images": images, "types": np.array(["Breast"] * n)}), ("masks", {"masks": masks})):
        (base / sub / "fold2").mkdir(parents=True)
        for key, value in arrays.items():
            np.save(base / sub / "fold2" / f"{key}.npy", value)
    return base


def files_in(folder: Path) -> set[str]:
    """Files (and links) under ``folder``, relative to it; empty folders do not count."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()}


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path, set[str]]]:
    """Each bad input run as ``python -m mlsys ...`` (this checkout's code) in its own micro
    folder, all started together (each imports torch and MLflow: ~10 s on a busy 2-core
    machine): name -> (the finished process, its folder, the files there before it ran)."""
    from mlsys import data
    from mlsys.model import build_model
    from mlsys.params import load_params
    from mlsys.train import save_weights

    tmp = tmp_path_factory.mktemp("refusals")
    cases = {"evaluate-no-clean": (micro_folder(tmp / "a"), ["evaluate", "model1"]),
             "augment-no-clean": (micro_folder(tmp / "b"), ["augment", "method2"]),
             "evaluate-no-weights": (micro_folder(tmp / "c"), ["evaluate", "model1"]),
             "pannuke-nan": (micro_folder(tmp / "d", {"data": {"source": "pannuke", "fold": 2, "pannuke_path":
                                                               str(write_fold(tmp / "fold-nan", 4, nan=True))}}),
                             ["prepare"]),
             "pannuke-two": (micro_folder(tmp / "e", {"data": {"source": "pannuke", "fold": 2, "pannuke_path":
                                                               str(write_fold(tmp / "fold-two", 2))}}),
                             ["prepare"]),
             "train-seed": (micro_folder(tmp / "f", {"train": {"seed": 3}}), ["prepare"])}
    folder = cases["evaluate-no-weights"][0]
    data.prepare(load_params(folder / "params.yaml").data, folder / paths.CLEAN, progress=False)
    for name in ("evaluate-no-clean", "augment-no-clean"):  # the stages load the weights before the data
        folder = cases[name][0]
        cfg = load_params(folder / "params.yaml").model
        save_weights(build_model(cfg), cfg, folder / paths.weights("model1", 0))
    procs = {}
    for name, (folder, args) in cases.items():
        env = micro.env_for(folder)
        env["PYTHONPATH"] = str(ROOT)
        before = files_in(folder)
        procs[name] = (subprocess.Popen([sys.executable, "-m", "mlsys", *args], cwd=folder, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE), args, before)
    done = {}
    for name, (proc, args, before) in procs.items():
        out, err = proc.communicate(timeout=600)
        done[name] = (subprocess.CompletedProcess(args, proc.returncode, out, err), cases[name][0], before)
    return done


def refusal(refusals, name: str) -> str:
    """The case's one stderr line, after checking exit status 2, no traceback, and that it left
    no file behind but the MLflow store (which records the stage's run FAILED)."""
    proc, folder, before = refusals[name]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, \
        f"mlsys {' '.join(proc.args)}: exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert lines[0].startswith(f"mlsys {proc.args[0]}: error: "), lines[0]
    left = files_in(folder) - before - {"mlflow.db"}
    assert not left, f"mlsys {' '.join(proc.args)} left {sorted(left)}"
    return lines[0]


@pytest.mark.slow  # six processes that each load torch and MLflow (~1 min)
@pytest.mark.parametrize("name", ["evaluate-no-clean", "augment-no-clean"])
def test_missing_clean_data_is_one_line(refusals, name):
    line = refusal(refusals, name)
    assert paths.CLEAN in line and "prepare stage" in line, line


@pytest.mark.slow  # six processes that each load torch and MLflow (~1 min)
def test_missing_weights_leave_no_partial_folder(refusals):
    line = refusal(refusals, "evaluate-no-weights")
    assert paths.weights("model1", 0) in line and "train-model1@0" in line, line
    out = Path(paths.eval_metrics("model1", 0))
    assert not (refusals["evaluate-no-weights"][1] / out.with_name(f".{out.name}.partial")).exists()


@pytest.mark.slow  # six processes that each load torch and MLflow (~1 min)
def test_pannuke_nan_is_reported_before_the_split(refusals):
    line = refusal(refusals, "pannuke-nan")  # 4 images: also too few for the split, but NaN comes first
    assert "NaN" in line and "data.split" not in line, line


@pytest.mark.slow  # six processes that each load torch and MLflow (~1 min)
def test_pannuke_too_few_images_for_the_split(refusals):
    from mlsys import data
    from mlsys.params import load_params

    ratios = load_params(refusals["pannuke-two"][1] / "params.yaml").data.split
    total = sum(ratios)
    need = next(m for m in range(1, 100) if min(m * ratios[0] // total, m * ratios[1] // total,
                                                m - m * ratios[0] // total - m * ratios[1] // total) >= 1)
    data.split_indices(need, ratios)          # enough: one image per split
    with pytest.raises(data.DataError):
        data.split_indices(need - 1, ratios)  # one fewer: refused
    line = refusal(refusals, "pannuke-two")
    assert "data.split" in line and f"at least {need} images" in line and "hold 2" in line, line


@pytest.mark.slow  # six processes that each load torch and MLflow (~1 min)
def test_train_seed_is_refused_naming_seeds(refusals):
    line = refusal(refusals, "train-seed")
    assert "train.seed" in line and "`seeds`" in line, line
    assert files_in(refusals["train-seed"][1]) == {"params.yaml"}  # refused before any run is opened


# --------------------------------------------------------------------------- kernel staleness
def test_require_current_tracks_the_csrc_digest(tmp_path, monkeypatch):
    from mlsys import _build, ops

    ops.require_current()  # this checkout's build is of its own csrc/
    if ops._BUILT_FROM is None:
        pytest.skip(f"ops served by {ops.backend()}: no native build to check")
    assert ops._BUILT_FROM == _build.csrc_digest(ROOT / "csrc")
    copy = Path(shutil.copytree(ROOT / "csrc", tmp_path / "csrc"))
    assert _build.csrc_digest(copy) == ops._BUILT_FROM
    (copy / "NOTES.txt").write_text("not a source")
    assert _build.csrc_digest(copy) == ops._BUILT_FROM  # only .cpp/.cu/.h/.cuh count
    with open(copy / "ops_cpu.cpp", "a") as f:
        f.write("// an edit\n")
    assert _build.csrc_digest(copy) != ops._BUILT_FROM
    monkeypatch.setattr(ops, "_CSRC", copy)  # the extension now sits beside edited sources
    with pytest.raises(ops.StaleBuildError) as err:
        ops.require_current()
    msg = str(err.value)
    assert isinstance(err.value, ops.InputError) and "\n" not in msg
    assert ops._BUILT_FROM in msg and _build.csrc_digest(copy) in msg and "make setup" in msg, msg


@pytest.mark.slow
def test_csrc_edit_makes_method_two_refuse_the_stale_build(pipeline, tmp_path):
    repo = micro.clone(pipeline[0], tmp_path / "repo")
    with open(repo / "csrc" / "ops_cpu.cpp", "a") as f:
        f.write("// a kernel edit\n")
    stage = paths.stage_name("augment", "method2", 0)
    proc = subprocess.run(["dvc", "repro", stage], cwd=repo, env=micro.env_for(repo), capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout + proc.stderr
    lines = [line for line in out.splitlines() if "the native ops (mlsys/_C) were built from csrc/" in line]
    assert proc.returncode != 0 and len(lines) == 1 and "make setup" in lines[0], out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    status = json.loads(micro.run(repo, "dvc", "status", "--json").stdout)
    assert stage in status, status
    changed = [e["changed deps"] for e in status[stage] if isinstance(e, dict) and "changed deps" in e]
    assert changed and changed[0].get("csrc") == "modified", status[stage]
