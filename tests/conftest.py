import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
SPARC = [sys.executable, "-m", "sparc_engine.cli"]


@pytest.fixture(scope="session")
def tiny():
    from sparc_engine.models import load_model

    return load_model("random:tiny")


@pytest.fixture(scope="session")
def embedded():
    from sparc_engine.models import load_model

    return load_model("embedded")


def sparc(*args, cwd=None, timeout=600, env=None):
    """Run the real CLI in a subprocess."""
    return subprocess.run([*SPARC, *map(str, args)], capture_output=True, text=True, cwd=cwd or ROOT,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_line_error(proc) -> str:
    """The CLI's error contract: exit code 2, one line on stderr starting with 'error:', no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [l for l in lines if l.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]
