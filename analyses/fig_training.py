"""Repair training curves: alignment and retain losses per step."""

import json

from common import ONE_COLUMN, arguments, print_style, write

from safereact_interp.plots import training_figure


def make(run, out):
    log = [json.loads(line) for line in (run / "repair" / "log.jsonl").read_text().splitlines() if line.strip()]
    figure = print_style(training_figure(log), font=8)
    return write(figure, out, "training", width=ONE_COLUMN, height=250)


if __name__ == "__main__":
    args = arguments(__doc__)
    print("\n".join(map(str, make(args.run, args.out))))
