"""experiments/main_job.py refuses a run directory that exists, before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "main_job.py"


def test_an_existing_out_directory_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "earlier_run"
    out.mkdir()
    (out / "results.md").write_text("earlier results\n")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True
    )
    assert done.returncode != 0
    assert f"--out {out} already exists" in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["results.md"]
    assert (out / "results.md").read_text() == "earlier results\n"
