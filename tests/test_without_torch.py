"""Config and data tests run without PyTorch: only the parity fixtures import it.

A subprocess runs pytest with torch hidden from every import finder (so ``import torch`` fails
as on a machine without it, and no ``torch`` key appears in ``sys.modules`` for libraries that
probe it) and checks that the tests pass and that torch was never imported.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNNER = textwrap.dedent(
    """
    import sys

    class Hide:
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch":
                return None
            find = getattr(self.finder, "find_spec", None)
            return None if find is None else find(name, path, target)

        def __getattr__(self, attr):
            return getattr(self.finder, attr)

    sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
    try:
        import torch  # noqa: F401
        raise SystemExit("torch is still importable")
    except ModuleNotFoundError:
        pass
    import pytest

    rc = pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]])
    if any(k.split(".")[0] == "torch" for k in sys.modules):
        raise SystemExit("torch was imported")
    raise SystemExit(rc)
    """
)


def test_config_and_data_tests_pass_without_torch():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            RUNNER,
            "tests/test_config.py",
            "tests/data/test_packing.py",
            "tests/data/test_synthetic.py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout
