"""Refusal rates and capability accuracy of base, post-trained, repaired and baseline models, with 95 %
bootstrap error bars."""

from common import TWO_COLUMN, arguments, print_style, read, write

from safereact_interp.plots import before_after_figure


def make(run, out):
    verification = read(run, "verification.json")
    figure = print_style(before_after_figure(verification, verification.get("intervals")), font=8)
    figure.update_traces(textfont_size=7)
    return write(figure, out, "before_after", width=TWO_COLUMN, height=300)


if __name__ == "__main__":
    args = arguments(__doc__)
    print("\n".join(map(str, make(args.run, args.out))))
