"""The shell commands of the README and docs/ work as typed in a fresh clone, with a PATH
that lacks .venv/bin: the stages (`bin/mlsys`) must find the project's interpreter themselves.
Every ```bash line of those pages is accounted for in ``COMMANDS``: the test that runs it, or
why the suite cannot run it."""
from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import micro
from mlsys.params import EXPERIMENT

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parents[1]  # the project's .venv (not resolved: its bin/ holds dvc, mlflow)
BARE_PATH = "/usr/local/bin:/usr/bin:/bin"
DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # the README first

FRESH_CLONE = "tests/test_readme.py::test_readme_commands_in_a_fresh_clone"
QUEUE = "tests/test_readme.py::test_queued_experiments_land_in_the_project_store"  # in the same clone
NOT_RUN = "not run: "
# Every command of a ```bash block in README.md and docs/*.md (its trailing `# comment` left
# off): the test that runs it ("tests/<file>.py::<test>", then any note), or NOT_RUN and why the
# suite cannot run it. A command added to the docs fails test_every_doc_command_is_accounted_for
# until it is listed here.
# what test_readme_commands_in_a_fresh_clone runs, in this order: doc_command's arguments
FRESH_CLONE_RUNS = [(".venv/bin/dvc repro",),
                    (".venv/bin/dvc exp run -S", "evaluate.attack.steps"),  # re-runs the evaluations only
                    (".venv/bin/dvc exp show",),
                    (".venv/bin/python -m mlsys compare",),
                    (".venv/bin/python -m mlsys runs sweep --dry-run",)]
COMMANDS = {
    # README.md
    "make repro": NOT_RUN + "its set-up installs packages from the network; its `dvc repro` is "
                            "`.venv/bin/dvc repro`, run by " + FRESH_CLONE,
    "make test": NOT_RUN + "the test suite itself (CI runs it: .ci/run)",
    ".venv/bin/dvc repro": FRESH_CLONE,
    ".venv/bin/python -m mlsys compare": FRESH_CLONE,
    ".venv/bin/python -m mlsys ui": "tests/test_ui.py::test_mlflow_ui_shows_the_four_models",
    # docs/experiments.md
    ".venv/bin/dvc exp run -S evaluate.attack.steps=100": FRESH_CLONE,
    ".venv/bin/dvc exp show": FRESH_CLONE,
    ".venv/bin/dvc exp run --queue -n eps-02 -S evaluate.attack.eps=0.02": QUEUE,
    ".venv/bin/dvc exp run --queue -n eps-05 -S evaluate.attack.eps=0.05": QUEUE,
    'PATH="$PWD/.venv/bin:$PATH" dvc exp run --run-all': QUEUE,
    ".venv/bin/dvc exp show --drop '.*' --keep 'Experiment|evaluate.attack.eps|champion.*|.*pipeline_run_id'":
        QUEUE,
    ".venv/bin/python -m mlsys paper /path/to/fold_2.zip":
        NOT_RUN + "PanNuke data are not present, and it is a GPU job; its --dry-run is "
                  "tests/test_cli.py::test_paper_command_sets_every_authors_choice_and_validates",
    ".venv/bin/python -m mlsys paper --official /path/to/fold_1.zip /path/to/fold_2.zip /path/to/fold_3.zip --split 2":
        NOT_RUN + "PanNuke data are not present, and it is a GPU job; its --dry-run is "
                  "tests/test_cli.py::test_paper_command_runs_the_official_protocol",
    # docs/native-ops.md
    '.venv/bin/python -c "import mlsys.ops; print(mlsys.ops.backend())"':
        "tests/test_ops.py::test_reference_can_be_forced (the same line, in a subprocess)",
    "make cuda-check": NOT_RUN + "fetches 0.63 GB of CUDA wheels from the network (CI runs it after the "
                                 "suite); its --dry-run is tests/test_cuda_check.py::test_dry_run_compiles_with_the_project_flags",
    ".venv/bin/python benchmarks/pipeline.py --config cpu-small":
        "tests/test_benchmarks.py::test_gpu_check_runs_its_steps_at_the_cpu_size (gpu_check.sh --cpu runs it)",
    ".venv/bin/python benchmarks/method2.py --config cpu-small":
        "tests/test_benchmarks.py::test_gpu_check_runs_its_steps_at_the_cpu_size (gpu_check.sh --cpu runs it, "
        "on one image)",
    ".venv/bin/python benchmarks/rerun.py metrics/report.json ../rerun/metrics/report.json":
        NOT_RUN + "it needs two complete runs of the default; the script itself is "
                  "tests/test_benchmarks.py::test_rerun_matches_findings_and_names_every_flip",
    ".venv/bin/python benchmarks/repro.py --no-run":
        "tests/test_benchmarks.py::test_repro_benchmark_splits_every_stage_of_the_pipeline_run",
    ".venv/bin/python benchmarks/screened.py --images 40":
        "tests/test_benchmarks.py::test_screened_benchmark_validates_and_reports_every_search (on 3 images)",
    ".venv/bin/python benchmarks/protocol.py --config default":
        "tests/test_benchmarks.py::test_protocol_benchmark_validates_every_attack_and_its_totals_add_up (--quick: "
        "16x16, 2 images, 2 steps)",
    "benchmarks/gpu_check.sh --cpu /tmp/gpu-check": "tests/test_benchmarks.py::test_gpu_check_runs_its_steps_at_the_cpu_size",
    # docs/operations.md
    ".venv/bin/python -m mlsys runs sweep --dry-run": FRESH_CLONE,
    ".venv/bin/python -m mlsys runs sweep": "tests/test_robustness.py::test_sweep_marks_the_killed_runs_failed",
    # docs/robustness.md
    ".venv/bin/python -m mlsys robust models:/mlsys-unet@champion data/clean.h5":
        "tests/test_robust_cli.py::test_champion_from_the_registry_is_attacked_at_any_size (a registry in a "
        "temporary store, its HDF5 file)",
    ".venv/bin/python -m mlsys robust fcn.pt my-slides/ --attacks segpgd,sea --radii 8 --steps 1":
        "tests/test_robust_cli.py::test_foreign_fcn_from_torchscript_and_from_module_function_on_hdf5_and_png "
        "(a TorchScript FCN on a PNG folder, these flags)",
    ".venv/bin/python -m mlsys robust mynets:fcn --weights fcn_state.pth data/clean.h5":
        "tests/test_robust_cli.py::test_foreign_fcn_from_torchscript_and_from_module_function_on_hdf5_and_png "
        "(test_robust_cli:small_fcn and its state_dict)",
    # docs/scale-out.md
    ".venv/bin/torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0.example.org:29400 "
    "--rdzv-id mlsys-model1 -m mlsys train model1":
        NOT_RUN + "several nodes with GPUs (one node's torchrun: "
                  "tests/test_distributed.py::test_two_process_ddp_training_matches_one_process)",
    "for i in 0 1 2 3; do .venv/bin/python -m mlsys augment method2 --seed 0 --shard $i/4 & done; wait":
        "tests/test_distributed.py::test_shards_and_ranks_merge_into_the_single_process_outputs (2 shards)",
    ".venv/bin/dvc repro augment-method2@0":
        "tests/test_distributed.py::test_shards_and_ranks_merge_into_the_single_process_outputs (the merge, run as "
        "the stage's command; DVC then finds the stage up to date)",
    # docs/team.md
    ".venv/bin/python -m mlsys server": "tests/test_server.py::test_pipeline_logs_to_a_tracking_server (on a free port)",
    "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000": "tests/test_server.py::test_pipeline_logs_to_a_tracking_server",
    "sudo -u postgres createuser --pwprompt mlflow":
        NOT_RUN + "needs root and the system's PostgreSQL service, and asks for a password; "
                  "tests/test_team.py::test_team_set_up runs a throwaway cluster instead",
    "sudo -u postgres createdb --owner mlflow mlflow":
        NOT_RUN + "needs root and the system's PostgreSQL service; tests/test_team.py::test_team_set_up "
                  "runs a throwaway cluster instead",
    "echo 'localhost:5432:mlflow:mlflow:<password>' >> ~/.pgpass && chmod 600 ~/.pgpass":
        NOT_RUN + "writes the user's ~/.pgpass; the throwaway cluster of tests/test_team.py::test_team_set_up "
                  "needs no password",
    ".venv/bin/python -m mlsys server --host 0.0.0.0 --port 5000 --backend-store-uri "
    "postgresql://mlflow@localhost:5432/mlflow --artifacts-destination /srv/mlflow/artifacts":
        "tests/test_team.py::test_team_set_up (on 127.0.0.1, a free port and a temporary folder)",
    ".venv/bin/dvc remote add -d shared /mnt/shared/mlsys-dvc": "tests/test_team.py::test_team_set_up (a temporary folder)",
    'git add .dvc/config dvc.lock metrics plots && git commit -m "shared DVC remote"':
        "tests/test_team.py::test_team_set_up (git add -A)",
    ".venv/bin/dvc push": "tests/test_team.py::test_team_set_up",
    "git clone <repo> mlsys && cd mlsys && make setup":
        NOT_RUN + "make setup installs packages from the network; tests/test_team.py::test_team_set_up "
                  "clones and uses the suite's .venv",
    ".venv/bin/dvc pull": "tests/test_team.py::test_team_set_up",
    # docs/testing.md
    "make test-fast": NOT_RUN + "a tier of the test suite itself (it would run this test)",
}


def bash_lines(text: str) -> list[str]:
    """The lines of the ```bash blocks of a Markdown text, backslash continuations joined."""
    lines, fence, pending = [], None, ""  # fence: the open block's language, None outside
    for raw in text.splitlines():
        if raw.strip().startswith("```"):
            fence = raw.strip()[3:].strip() if fence is None else None
            continue
        if fence == "bash":
            line = pending + raw.strip()
            if line.endswith("\\"):
                pending = line[:-1].rstrip() + " "
                continue
            pending = ""
            lines.append(line)
    return lines


def doc_command(prefix: str, prefer: str | None = None) -> str:
    """The first ```bash line of README.md and docs/*.md (the README first, then the pages by
    name) that is ``prefix`` or starts with ``prefix`` and a space (with ``prefer``: the first
    such line containing it, if any)."""
    found = [line for page in DOC_PAGES for line in bash_lines(page.read_text())
             if line == prefix or line.startswith(prefix + " ")]
    assert found, f"no ```bash line of README.md or docs/*.md starts with {prefix!r}"
    if prefer is None:
        return found[0]
    preferred = [line for line in found if prefer in line]
    assert preferred, f"no ```bash line starting with {prefix!r} contains {prefer!r}: {found}"
    return preferred[0]


def command_of(line: str) -> str:
    """A ```bash line without its trailing `# comment`."""
    return re.sub(r"\s+#\s.*$", "", line).strip()


def doc_commands() -> dict[str, list[str]]:
    """Every command of a ```bash block of README.md and docs/*.md -> the pages that show it."""
    out: dict[str, list[str]] = {}
    for page in DOC_PAGES:
        for line in bash_lines(page.read_text()):
            if line and not line.startswith("#"):
                out.setdefault(command_of(line), []).append(str(page.relative_to(ROOT)))
    return out


def test_bash_lines_reads_blocks_only():
    text = "```bash\na \\\n  b\n# c\n```\n```\nnot bash\n```\n```python\nx = 1\n```\n```bash\nd  # note\n```\n"
    assert bash_lines(text) == ["a b", "# c", "d  # note"]


def test_every_doc_command_is_accounted_for():
    shown = doc_commands()
    assert len(shown) > 20, shown  # the pages were read
    missing = {cmd: pages for cmd, pages in shown.items() if cmd not in COMMANDS}
    assert not missing, ("commands of the docs that COMMANDS (tests/test_readme.py) does not list; add each "
                         f"with the test that runs it, or why it cannot run: {missing}")
    stale = sorted(set(COMMANDS) - set(shown))
    assert not stale, f"COMMANDS lists commands that no page shows any more: {stale}"


def test_command_table_names_tests_that_exist_or_a_reason():
    defined: dict[str, set[str]] = {}
    for cmd, how in COMMANDS.items():
        if how.startswith(NOT_RUN):
            assert len(how) > len(NOT_RUN) + 10, f"{cmd!r}: say why it cannot run"
            continue
        file, _, name = how.split()[0].partition("::")
        assert (ROOT / file).is_file() and name, f"{cmd!r}: {how!r} names no test file"
        if file not in defined:
            tree = ast.parse((ROOT / file).read_text())
            defined[file] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in defined[file], f"{cmd!r}: {file} has no test {name}"


def test_the_fresh_clone_runs_the_commands_the_table_gives_it():
    ran = [command_of(doc_command(*args)) for args in FRESH_CLONE_RUNS]
    assert ran[1] == ".venv/bin/dvc exp run -S evaluate.attack.steps=100", ran
    assert sorted(ran) == sorted(cmd for cmd, how in COMMANDS.items() if how == FRESH_CLONE)


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory) -> dict:
    """A fresh clone of a micro repository, used with a PATH that lacks .venv/bin, after the
    commands of FRESH_CLONE_RUNS ran in it as typed: {"repo", "env", "out" (command -> stdout),
    "stage_runs" (run name -> status after the first command, `dvc repro`)}."""
    tmp_path = tmp_path_factory.mktemp("fresh")
    src = micro.make_repo(tmp_path / "src", json.loads(json.dumps(micro.MICRO)))
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(src), str(clone)], check=True, env=micro.env_for(src))
    # what `make setup` leaves in a checkout, without re-installing the package onto the clone
    (clone / ".venv").symlink_to(VENV, target_is_directory=True)
    built = sorted((ROOT / "mlsys").glob("_C*.so"))
    assert built, "mlsys/_C*.so is not built in this checkout (`make setup`)"
    for so in built:
        shutil.copy2(so, clone / "mlsys" / so.name)
    env = micro.env_for(clone)
    for key in ("MLSYS_PYTHON", "PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(key, None)
    env["PATH"] = BARE_PATH
    assert shutil.which("dvc", path=BARE_PATH) is None and shutil.which("mlflow", path=BARE_PATH) is None

    commands = [doc_command(*args) for args in FRESH_CLONE_RUNS]
    out, stage_runs = {}, {}
    for cmd in commands:
        out[cmd] = typed(cmd, clone, env)
        if cmd == commands[0]:  # every stage ran and logged its run with the project's interpreter
            _, runs = micro.runs_of(clone)
            stage_runs = {r.info.run_name: r.info.status for r in runs if r.data.tags.get("mlsys.kind") == "stage"}
    return {"repo": clone, "env": env, "out": out, "stage_runs": stage_runs}


def typed(cmd: str, cwd: Path, env: dict) -> str:
    """A docs command line run as typed (bash) in ``cwd``: its stdout (micro.run fails naming it)."""
    return micro.run(cwd, "bash", "-c", cmd, env=env, timeout=1800).stdout


@pytest.mark.slow
def test_readme_commands_in_a_fresh_clone(fresh_clone):
    commands = [doc_command(*args) for args in FRESH_CLONE_RUNS]
    out = fresh_clone["out"]
    assert fresh_clone["stage_runs"] == dict.fromkeys(micro.STAGES, "FINISHED"), fresh_clone["stage_runs"]
    assert "workspace" in out[commands[2]], out[commands[2]]
    assert all(m in out[commands[3]] for m in micro.MODELS), out[commands[3]]
    assert re.search(r"^0 run\(s\) left RUNNING by a crash \(dry run\)$", out[commands[4]], re.M), out[commands[4]]



@pytest.mark.slow
def test_queued_experiments_land_in_the_project_store(fresh_clone):
    """docs/experiments.md's queue, typed in the fresh clone after its baseline is committed:
    DVC experiments queued and run in DVC's temporary workspaces log to the project's own
    MLflow store (absolute URI), each under its own pipeline run tagged with the experiment's
    name; only the stages that depend on the changed parameter run; `dvc exp show` lists the
    experiments with their headline metrics and run ids."""
    repo, env = fresh_clone["repo"], fresh_clone["env"]
    typed("git add -A && git commit -qm baseline", repo, env)  # as the page says: the baseline first
    for name in ("eps-02", "eps-05"):
        typed(doc_command(f".venv/bin/dvc exp run --queue -n {name}"), repo, env)
    out = typed(command_of(doc_command('PATH="$PWD/.venv/bin:$PATH" dvc exp run --run-all')), repo, env)
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]
    evaluate = [f"evaluate-{m}@{s}" for m in EXPERIMENT for s in micro.MICRO["seeds"]]
    assert sorted(ran) == sorted(2 * (evaluate + ["report"])), "only what depends on evaluate.* runs"

    client, runs = micro.runs_of(repo)
    for name, eps in (("eps-02", "0.02"), ("eps-05", "0.05")):
        mine = [r for r in runs if r.data.tags.get("dvc.experiment") == name]
        parents = [r for r in mine if r.data.tags.get("mlsys.kind") == "pipeline"]
        assert len(parents) == 1 and parents[0].info.run_name.endswith(f"[{name}]"), [r.info.run_name for r in mine]
        stages = {r.info.run_name for r in mine if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
        assert stages == {*evaluate, "report"}
        assert all(r.info.status == "FINISHED" for r in mine)
        assert {r.data.params["evaluate.attack.eps"] for r in mine if r.info.run_name.startswith("evaluate-")} == {eps}
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db")), "no store inside DVC's temporary workspaces"

    show = json.loads(micro.run(repo, "dvc", "exp", "show", "--json").stdout)
    exps = {r["name"]: r for base in show for e in base.get("experiments") or [] for r in e["revs"]}
    assert {"eps-02", "eps-05"} <= set(exps), list(exps)
    for name in ("eps-02", "eps-05"):
        metrics = exps[name]["data"]["metrics"]
        run_id = metrics["metrics/report.json"]["data"]["mlflow"]["pipeline_run_id"]
        assert client.get_run(run_id).data.tags["dvc.experiment"] == name
        assert 0 <= metrics["metrics/eval/seed0/model1.json"]["data"]["attack"]["dice"] <= 1
    # the table of docs/experiments.md, as it shows it (its sample output is this command's, from this test)
    table = typed(doc_command(".venv/bin/dvc exp show --drop"), repo, env)
    print(table)
    assert "champion.seed" in table and "eps-02" in table and "eps-05" in table
