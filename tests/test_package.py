"""The package as a user meets it: public names, typing marker, style, README commands and example."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import salmask

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_public_name_exists_and_is_documented():
    for name in salmask.__all__:
        obj = getattr(salmask, name)
        if callable(obj) or isinstance(obj, type(salmask)):
            assert obj.__doc__, f"{name} has no docstring"


def test_typing_marker_ships_with_the_package():
    assert (Path(salmask.__file__).parent / "py.typed").exists()


def bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_readme_starts_with_the_main_job_and_the_test_command():
    main_job, tests = (block.strip() for block in bash_blocks()[:2])
    assert "examples/" in main_job
    ci_script = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert tests == ci_script, ".ci/run must run exactly the README's test command"


def test_readme_usage_example_runs_as_written(tmp_path):
    code = re.search(r"## Usage.*?```python\n(.*?)```", README, flags=re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    # Every draw masks something (spatial, channel-wise and focal masks alike): run it under several seeds.
    seeded = "\n".join(f"import torch\ntorch.manual_seed({seed})\n{code}" for seed in range(8))
    result = subprocess.run([sys.executable, "-c", seeded], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    fractions = re.findall(r"(\d+)% of the view masked", result.stdout)
    assert len(fractions) == 8 and all(int(fraction) > 0 for fraction in fractions), result.stdout


@pytest.mark.skipif(
    shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(), reason="ruff is not installed"
)
def test_code_is_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    for command in ([ruff, "check", "."], [ruff, "format", "--check", "."]):
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
