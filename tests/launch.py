"""Run a script under torchrun and collect what rank 0 reports.

Multi-process tests are driven from scripts (``tests/scripts/``) because Lightning's
launcher re-runs ``sys.argv``: an in-process pytest run cannot host several ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "scripts"


class ScriptFailed(AssertionError):
    pass


def run_script(
    script: str,
    nproc: int,
    *args: str | int | float,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    expect_failure: bool = False,
) -> dict[str, Any] | subprocess.CompletedProcess:
    """Launch ``tests/scripts/<script>`` on ``nproc`` ranks; return rank 0's JSON report.

    Scripts receive ``--out PATH`` and write their report there (see
    ``tests/scripts/common.py:report``). With ``expect_failure`` the completed process is
    returned instead, for tests that check error messages.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            str(SCRIPTS / script),
            "--out",
            str(out),
            *map(str, args),
        ]
        full_env = {
            **os.environ,
            "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        proc = subprocess.run(
            cmd, cwd=tmp, env=full_env, capture_output=True, text=True, timeout=timeout
        )
        if expect_failure:
            if proc.returncode == 0:
                raise ScriptFailed(f"{script} was expected to fail but succeeded:\n{proc.stdout}")
            return proc
        if proc.returncode != 0:
            raise ScriptFailed(
                f"{script} {' '.join(map(str, args))} failed with exit code {proc.returncode}:\n"
                f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-12000:]}"
            )
        return json.loads(out.read_text())
