"""Every ```python block of README.md runs as written: each in a fresh interpreter, in an empty
temporary folder (a block may write files there), with the seq2seq_fast under test."""
import os
import re
import subprocess
import sys

import pytest

from helpers import REPO_ROOT, child_env

with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
    README = f.read()
# (first line number, code) of each block
BLOCKS = [(README[: m.start(1)].count("\n") + 1, m.group(1))
          for m in re.finditer(r"^```python\n(.*?)^```$", README, re.M | re.S)]


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 1, "the scan found no ```python block (a test of nothing could never fail)"


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md-line{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(line, code, tmp_path):
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=child_env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, f"README.md block at line {line} failed:\n{run.stderr}"
