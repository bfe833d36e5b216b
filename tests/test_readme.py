"""The README's shell commands work as typed in a fresh clone, with a PATH that lacks
.venv/bin: the stages (`bin/mlsys`) must find the project's interpreter themselves."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import micro

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parents[1]  # the project's .venv (not resolved: its bin/ holds dvc, mlflow)
BARE_PATH = "/usr/local/bin:/usr/bin:/bin"


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


def readme_command(prefix: str, prefer: str | None = None) -> str:
    """The README's first ```bash line that is ``prefix`` or starts with ``prefix`` and a
    space (with ``prefer``: the first such line containing it, if any)."""
    found = [line for line in bash_lines((ROOT / "README.md").read_text())
             if line == prefix or line.startswith(prefix + " ")]
    assert found, f"README.md has no ```bash line starting with {prefix!r}"
    return next((line for line in found if prefer and prefer in line), found[0])


def test_bash_lines_reads_blocks_only():
    text = "```bash\na \\\n  b\n# c\n```\n```\nnot bash\n```\n```python\nx = 1\n```\n```bash\nd  # note\n```\n"
    assert bash_lines(text) == ["a b", "# c", "d  # note"]


@pytest.mark.slow
def test_readme_commands_in_a_fresh_clone(tmp_path):
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

    commands = [readme_command(".venv/bin/dvc repro"),
                readme_command(".venv/bin/dvc exp run -S", prefer="evaluate.attack.steps"),
                readme_command(".venv/bin/dvc exp show"),
                readme_command(".venv/bin/python -m mlsys compare"),
                readme_command(".venv/bin/python -m mlsys runs sweep --dry-run")]
    out = {}
    for cmd in commands:
        proc = subprocess.run(["bash", "-c", cmd], cwd=clone, env=env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"{cmd!r} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        out[cmd] = proc.stdout
        if cmd == commands[0]:  # every stage ran and logged its run with the project's interpreter
            _, runs = micro.runs_of(clone)
            stage_runs = {r.info.run_name: r.info.status for r in runs if r.data.tags.get("mlsys.kind") == "stage"}
            assert stage_runs == dict.fromkeys(micro.STAGES, "FINISHED"), stage_runs
    assert "workspace" in out[commands[2]], out[commands[2]]
    assert all(m in out[commands[3]] for m in micro.MODELS), out[commands[3]]
    assert re.search(r"^0 run\(s\) left RUNNING by a crash \(dry run\)$", out[commands[4]], re.M), out[commands[4]]
