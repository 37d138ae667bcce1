"""Activation patching curve: fraction of the refusal score restored per layer, chosen layers marked."""

from common import TWO_COLUMN, arguments, print_style, read, write

from safereact_interp.plots import patching_figure


def make(run, out):
    patching = read(run, "patching.json")
    figure = print_style(patching_figure(patching, patching["selection"]["layers"]))
    return write(figure, out, "patching", width=TWO_COLUMN, height=300)


if __name__ == "__main__":
    args = arguments(__doc__)
    print("\n".join(map(str, make(args.run, args.out))))
