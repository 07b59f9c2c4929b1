"""Put a reproduction's report into docs/results.md (its own marked section, so the main job's
section stays) and its plots into docs/results/.

    python experiments/publish_results.py runs/reproduce-cpu-small     # `make results` runs this
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

START, END = "<!-- reproduce:start -->", "<!-- reproduce:end -->"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a difflora reproduce --out directory")
    p.add_argument("--doc", type=Path, default=Path("docs/results.md"))
    args = p.parse_args()
    report = (args.run / "report.md").read_text()
    if "(DRY RUN)" in report.splitlines()[0]:
        raise SystemExit(f"{args.run} is a dry run; its numbers mean nothing")
    figures = args.doc.parent / "results"
    figures.mkdir(parents=True, exist_ok=True)
    for png in sorted(args.run.glob("*.png")):
        shutil.copyfile(png, figures / png.name)
    # headings one level down, plots from docs/results/
    body = re.sub(r"^(#+) ", r"#\1 ", report, flags=re.MULTILINE)
    body = re.sub(r"!\[([^\]]*)\]\(([^)/]+\.png)\)", r"![\1](results/\2)", body)
    section = f"{START}\n{body.rstrip()}\n{END}"
    text = args.doc.read_text() if args.doc.exists() else "# Results\n"
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    args.doc.write_text(text)
    print(f"wrote {args.doc} and {figures}/")


if __name__ == "__main__":
    main()
