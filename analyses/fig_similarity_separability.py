"""Per-layer direction similarity and separability, with 95 % bootstrap bands (organism run)."""

from common import ONE_COLUMN, arguments, print_style, read, write

from safereact_interp.diagnose import Diagnosis
from safereact_interp.plots import diagnosis_figures


def make(run, out):
    diagnosis = Diagnosis.from_dict(read(run, "diagnosis.json"))
    figures = diagnosis_figures({"post": diagnosis}, {"post": diagnosis.intervals})
    written = []
    for name in ("similarity", "separability"):
        written += write(print_style(figures[name]), out, f"{name}", width=ONE_COLUMN, height=250)
    return written


if __name__ == "__main__":
    args = arguments(__doc__)
    print("\n".join(map(str, make(args.run, args.out))))
