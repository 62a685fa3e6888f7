"""The README's examples run as written (``examples/``), and the README shows them as they
are: every line of a README code block marked ``<!-- example: PATH -->`` appears, in
order, in that file."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.launch import REPO

EXAMPLES = REPO / "examples"


def _run(cmd: list[str], cwd, timeout: float = 420) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # the package as installed, like a user's checkout
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc.stdout + proc.stderr  # Lightning logs its info lines to stderr


def _losses(output: str) -> list[float]:
    return [float(v) for v in re.findall(r"^step \d+: loss ([0-9.]+)", output, re.MULTILINE)]


def test_trainer_example(tmp_path) -> None:
    out = _run([sys.executable, str(EXAMPLES / "trainer.py"), "--max-steps", "3"], tmp_path)
    assert "MiCS: 4 ranks = 2 nodes x 2" in out
    assert re.search(r"final train_loss [0-9.]+", out), out


def test_fabric_example(tmp_path) -> None:
    out = _run(
        [sys.executable, str(EXAMPLES / "fabric.py"), "--steps", "3", "--checkpoint", "ck"],
        tmp_path,
    )
    assert len(_losses(out)) == 3, out
    assert "saved and reloaded ck at step 3" in out
    assert (tmp_path / "ck").is_dir()  # a sharded checkpoint


def test_plain_pytorch_example(tmp_path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=4",
        str(EXAMPLES / "plain_pytorch.py"),
        "--ranks-per-node",
        "2",
        "--steps",
        "3",
    ]
    out = _run(cmd, tmp_path)
    assert "replication_size=2" in out
    assert len(_losses(out)) == 3, out


def _readme_excerpts() -> list[tuple[str, list[str]]]:
    text = (REPO / "README.md").read_text()
    pattern = re.compile(r"<!-- example: (\S+) -->\s*```python\n(.*?)```", re.DOTALL)
    return [(path, block.splitlines()) for path, block in pattern.findall(text)]


def test_readme_marks_every_example() -> None:
    shown = {path for path, _ in _readme_excerpts()}
    assert shown == {f"examples/{p.name}" for p in EXAMPLES.glob("*.py")}


@pytest.mark.parametrize("path, lines", _readme_excerpts())
def test_readme_excerpt_is_in_the_example(path: str, lines: list[str]) -> None:
    source = (REPO / path).read_text().splitlines()
    position = 0
    for line in filter(str.strip, lines):
        if line.strip() == "...":
            continue  # an elision in the README
        while position < len(source) and source[position].rstrip() != line.rstrip():
            position += 1
        assert position < len(source), f"README line not in {path} (in order): {line!r}"
        position += 1
