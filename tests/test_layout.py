"""The layout of the project agrees with itself: dvc.yaml's stages list the code they execute
(derived from the imports), the model list and every path match mlsys.params / mlsys.paths,
bad input ends in one line and exit status 2 leaving nothing behind, and an edit of csrc/
makes method two refuse the stale native build."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import micro
from mlsys import closure, paths
from mlsys.params import BASELINES, EXPERIMENT, METHODS, MODELS

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mlsys"


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


# --------------------------------------------------------------------------- code deps = import closure
def stage_module(cmd: str) -> str:
    """The module a stage runs: its cmd is ``bin/python -m mlsys.<module> ...``."""
    words = cmd.split()
    assert words[:2] == ["bin/python", "-m"] and words[2].startswith("mlsys."), f"cmd {cmd!r}"
    assert (PKG / f"{words[2][len('mlsys.'):]}.py").is_file(), f"cmd {cmd!r} runs no module of mlsys/"
    return words[2]


def code_dep_errors(all_stages: dict[str, dict]) -> list[str]:
    """One line per stage whose Python deps differ from its module's import closure: each
    missing file, each extra one. (Non-Python deps such as csrc/ are declared beside it.)"""
    errors = []
    for name, st in all_stages.items():
        want = set(closure.files(stage_module(st["cmd"])))
        have = {d for d in st["deps"] if d.startswith("mlsys/")}
        errors += [f"stage {name} executes {f} but does not depend on it" for f in sorted(want - have)]
        errors += [f"stage {name} depends on {f}, which it does not execute" for f in sorted(have - want)]
    return errors


def test_import_closure_sees_function_level_imports():
    source = "import os\nfrom . import params\n\ndef f():\n    from .files import atomic_path\n    import mlsys.paths\n"
    assert closure.imported(source) == {"params", "files", "paths"}
    assert closure.imported("from mlsys import _C, data\n") == {"data"}  # the compiled _C is no file
    # evaluate imports figures/tracking only inside a function; method two reaches the kernels' build flags
    assert {"figures", "tracking", "paths", "weights"} <= set(closure.modules("evaluate"))
    assert {"ops", "_build", "augment"} <= set(closure.modules("mlsys.method2"))


def test_stages_depend_on_exactly_the_code_they_execute():
    all_stages = stages()
    assert set(all_stages) == micro.stages(seeds()), "dvc.yaml's stages are not those of mlsys.paths.stage_name"
    errors = code_dep_errors(all_stages)
    assert not errors, "\n".join(errors)
    for s in seeds():
        deps = all_stages[paths.stage_name("augment", "method2", s)]["deps"]
        assert "csrc" in deps and "setup.py" in deps, f"augment-method2@{s} must depend on csrc and setup.py"


def test_a_wrong_dep_is_reported_both_ways():
    """The check names the stage and the module when a dep is missing or one is too many."""
    all_stages = stages()
    name = paths.stage_name("evaluate", "model2", seeds()[0])
    all_stages[name]["deps"].remove("mlsys/tracking.py")
    all_stages[name]["deps"].append("mlsys/ops.py")
    assert code_dep_errors(all_stages) == [f"stage {name} executes mlsys/tracking.py but does not depend on it",
                                           f"stage {name} depends on mlsys/ops.py, which it does not execute"]


def test_each_stage_executes_only_what_it_uses():
    """No training stage holds attack code; method one holds no method-two ops; the CLI and
    the presets belong to no stage."""
    every = set().union(*(closure.modules(stage_module(st["cmd"])) for st in stages().values()))
    assert not {"cli", "__main__", "presets"} & every
    assert not {"attacks", "robust", "ops", "method1", "method2", "synthetic", "adversarial"} & set(
        closure.modules("train"))
    # the baselines' stage runs the one training loop with the attacks' PGD loop, nothing more
    assert set(closure.modules("adversarial")) == set(closure.modules("train")) | {"adversarial", "attacks"}
    for name, st in stages().items():
        if name.startswith("train-"):
            baseline = name.split("@")[0][len("train-"):] in BASELINES
            assert stage_module(st["cmd"]) == ("mlsys.adversarial" if baseline else "mlsys.train"), name
    assert not {"ops", "_build", "method2", "robust"} & set(closure.modules("method1"))
    assert "robust" not in closure.modules("method2") and "robust" not in closure.modules("report")


def import_graph() -> dict[str, set[str]]:
    """Every module of mlsys/ -> the mlsys modules it imports, inside functions included."""
    return {p.stem: closure.imported(p.read_text(), str(p)) - {p.stem} for p in sorted(PKG.glob("*.py"))}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (one path per cycle found by a depth-first search)."""
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                found.append(path[path.index(d):] + [m, d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return found


def test_no_import_cycles_in_the_package():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})  # the check finds one
    assert not cycles({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}})
    found = cycles(import_graph())
    assert not found, "import cycles (imports inside functions count): " + "; ".join(" -> ".join(c) for c in found)


# --------------------------------------------------------------------------- models and paths
def _groups(all_stages: dict, job: str) -> set[str]:
    return {n.split("@")[0][len(job) + 1:] for n in all_stages if n.startswith(f"{job}-")}


def test_models_and_paths_agree_with_dvc_yaml():
    all_stages = stages()
    assert _groups(all_stages, "train") == set(EXPERIMENT) == set(MODELS) | set(BASELINES)
    assert _groups(all_stages, "evaluate") == set(EXPERIMENT)
    assert _groups(all_stages, "augment") == set(METHODS)
    prep = all_stages["prepare"]
    assert prep["outs"] == [paths.CLEAN] and prep["metrics"] == []
    rep = all_stages["report"]
    assert set(rep["outs"]) == {paths.REPORT, paths.REPORT_PLOTS} and rep["metrics"] == [paths.REPORT_METRICS]

    def data_deps(st):
        return {d for d in st["deps"] if d.startswith(("data/", "models/"))}

    for s in seeds():
        for m, sets in EXPERIMENT.items():
            st = all_stages[paths.stage_name("train", m, s)]
            # the training sets of MODELS, plus the clean data's validation split (train.py)
            assert data_deps(st) == {paths.dataset(n, s) for n in sets} | {paths.CLEAN}, f"train-{m}@{s}"
            assert set(st["outs"]) == {paths.weights(m, s), paths.train_plot(m, s)}, f"train-{m}@{s}"
            assert st["metrics"] == [paths.train_metrics(m, s)], f"train-{m}@{s}"
            st = all_stages[paths.stage_name("evaluate", m, s)]
            # the clean test split, and the transfer sets of the cross-evaluation
            assert data_deps(st) == {paths.CLEAN, paths.weights(m, s),
                                     *(paths.transfer(t, s) for t in METHODS)}, f"evaluate-{m}@{s}"
            assert st["outs"] == [paths.eval_figures(m, s)], f"evaluate-{m}@{s}"
            assert st["metrics"] == [paths.eval_metrics(m, s)], f"evaluate-{m}@{s}"
        for b in BASELINES:  # the adversarial keys a baseline reads, and train's (its loop's) sections
            from mlsys.adversarial import FIELDS

            st = all_stages[paths.stage_name("train", b, s)]
            assert st["params"] == ["model", "train", "distributed.nproc.train",
                                    *(f"adversarial.{k}" for k in FIELDS[b])], f"train-{b}@{s}"
            assert st["cmd"].split()[2:] == ["mlsys.adversarial", b, "--seed", str(s)], f"train-{b}@{s}"
        for method in METHODS:
            st = all_stages[paths.stage_name("augment", method, s)]
            assert data_deps(st) == {paths.CLEAN, paths.weights("model1", s)}, f"augment-{method}@{s}"
            assert st["outs"] == [paths.dataset(method, s), paths.transfer(method, s)], f"augment-{method}@{s}"
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
    from mlsys import data, prepare
    from mlsys.model import build_model
    from mlsys.params import load_params
    from mlsys.weights import save_weights

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
    prepare.prepare(load_params(folder / "params.yaml").data, folder / paths.CLEAN, progress=False)
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
    from mlsys import data, prepare
    from mlsys.params import load_params

    ratios = load_params(refusals["pannuke-two"][1] / "params.yaml").data.split
    total = sum(ratios)
    need = next(m for m in range(1, 100) if min(m * ratios[0] // total, m * ratios[1] // total,
                                                m - m * ratios[0] // total - m * ratios[1] // total) >= 1)
    prepare.split_indices(need, ratios)          # enough: one image per split
    with pytest.raises(data.DataError):
        prepare.split_indices(need - 1, ratios)  # one fewer: refused
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


# --------------------------------------------------------------------------- what an edit re-runs
def changed_stages(repo: Path) -> set[str]:
    """The stages `dvc status` lists as changed in ``repo``."""
    return set(json.loads(micro.run(repo, "dvc", "status", "--json").stdout))


@pytest.mark.slow
def test_an_edit_reruns_only_the_stages_that_execute_it(pipeline, tmp_path):
    """Real edits in a copy of the run micro pipeline, as `dvc status` sees them: a new attack
    the protocol can select re-runs the evaluate stages and nothing upstream; an edit to the
    CLI or the paper preset re-runs nothing; an edit to method two's scoring re-runs method
    two and not method one."""
    repo = micro.clone(pipeline[0], tmp_path / "repo")
    evaluate = {n for n in micro.stages(micro.PIPELINE_SEEDS) if n.startswith("evaluate-")}
    assert changed_stages(repo) == set()
    robust = repo / "mlsys" / "robust.py"
    source = robust.read_text()
    robust.write_text(source.replace('\nATTACKS: dict[str, Attack] = {"pgd": _pgd,', '''
def _fgsm(model, x, y, eps, steps, alpha, generator, on_step, amp):
    """One untargeted FGSM step of size eps on the pixel CE (steps and alpha unused)."""
    return fgsm(model, x, y, eps, targeted=False, amp=amp)


ATTACKS: dict[str, Attack] = {"fgsm": _fgsm, "pgd": _pgd,''').replace(
        "from .attacks import Loss, OnStep,", "from .attacks import Loss, OnStep, fgsm,"))
    micro.run(repo, sys.executable, "-c", "from mlsys import robust; from mlsys.params import RobustParams; "
              "robust.check(RobustParams(attacks=['fgsm', 'sea']))")  # a valid choice now
    assert changed_stages(repo) == evaluate
    robust.write_text(source)

    with open(repo / "mlsys" / "cli.py", "a") as f:
        f.write("\n# an edit of the CLI\n")
    with open(repo / "mlsys" / "presets.py", "a") as f:
        f.write("\n# an edit of the paper preset\n")
    assert changed_stages(repo) == set()

    ops = repo / "mlsys" / "ops.py"
    ops.write_text(ops.read_text().replace('scores = (prob - onehot[None]).abs().mean(dim=(1, 2, 3))',
                                           'scores = (prob - onehot[None]).abs().mean(dim=(1, 2, 3)) * 1.0'))
    changed = changed_stages(repo)
    assert changed == {paths.stage_name("augment", "method2", s) for s in micro.PIPELINE_SEEDS}, changed
