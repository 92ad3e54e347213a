"""Every Python block of README.md runs as written, in a fresh process and
an empty directory, with residency on and off, and on Metal where the build
has it (the simulated Metal on Linux)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from mlxbuf._cmetal import lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.MULTILINE | re.DOTALL)
HAS_METAL = bool(lib.cm_backend_available(lib.CM_BACKEND_METAL))

MODES = [
    pytest.param({"MLXBUF_NO_RESIDENCY": "0"}, True, id="residency-on"),
    pytest.param({"MLXBUF_NO_RESIDENCY": "1"}, False, id="residency-off"),
    pytest.param(
        {"MLXBUF_BACKEND": "metal", "MLXBUF_NO_RESIDENCY": "0"}, True, id="metal",
        marks=pytest.mark.skipif(not HAS_METAL, reason="this build has no Metal backend (real or simulated)"),
    ),
]


def test_the_readme_has_python_blocks():
    assert BLOCKS, "no ```python block found in README.md"


@pytest.mark.parametrize("env_changes, residency", MODES)
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i + 1}")
def test_readme_block_runs_as_written(tmp_path, index, env_changes, residency):
    script = tmp_path / "block.py"
    script.write_text(BLOCKS[index])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env_changes)
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"README block {index + 1} failed:\n{r.stdout}\n{r.stderr}"
    if "residency_set" in BLOCKS[index]:
        # The mode took effect: the tour prints commit counts only when residency is on.
        assert ("residency commits:" in r.stdout) == residency, r.stdout
