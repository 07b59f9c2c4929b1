"""Execute the ablation notebooks (notebooks/*.py, jupytext percent format) and write each as
an .ipynb with its outputs (`make notebooks` runs this).

    python experiments/execute_notebooks.py [notebooks/lambda_fixed_vs_learned.py ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jupytext
import nbclient


def main() -> None:
    root = Path(__file__).resolve().parents[1] / "notebooks"
    sources = [Path(a) for a in sys.argv[1:]] or sorted(root.glob("*.py"))
    for source in sources:
        start = time.time()
        notebook = jupytext.read(source)
        client = nbclient.NotebookClient(
            notebook, timeout=600, kernel_name="python3",
            resources={"metadata": {"path": str(source.parent)}},
        )  # fmt: skip
        client.execute()
        jupytext.write(notebook, source.with_suffix(".ipynb"))
        print(f"{source.with_suffix('.ipynb')}: executed in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
