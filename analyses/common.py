"""Shared helpers of the analysis scripts: argument parsing, run-folder reading and figure export."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safereact_interp.plots import save_figure

FORMATS = ("html", "png", "svg", "pdf")
DEFAULT_RUN = Path("runs/figures")
DEFAULT_OUT = Path("figures")


def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN, help="run folder written by `safereact run`")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the figures")
    return parser.parse_args()


def read(run: Path, name: str) -> dict:
    path = run / name
    if not path.is_file():
        raise SystemExit(f"{path} not found; run `python analyses/make_all.py --run {run}` first")
    return json.loads(path.read_text())


def write(figure, out: Path, name: str, *, width: int, height: int) -> list[Path]:
    """Write HTML (interactive, full size) and PNG/SVG/PDF at the given print size."""
    written = save_figure(figure, out, name, formats=("html",))
    figure.update_layout(width=width, height=height)
    written += save_figure(figure, out, name, formats=FORMATS[1:])
    return written


# Print sizes in pixels at 96 px per inch: one column 3.5 in, two columns 7 in.
ONE_COLUMN = 336
TWO_COLUMN = 672


def print_style(figure, *, font: int = 9):
    """Smaller fonts and margins for the static exports."""
    figure.update_layout(font=dict(size=font), title=dict(font=dict(size=font + 1)),
                         margin=dict(l=52, r=12, t=48, b=42),
                         legend=dict(font=dict(size=font - 1)))
    return figure
