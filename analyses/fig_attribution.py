"""Component attribution: change of the attention and MLP contributions to the safety signal and to the
residual norm, and of every head's safety-signal contribution."""

from common import ONE_COLUMN, TWO_COLUMN, arguments, print_style, read, write

from safereact_interp.plots import attribution_figure, head_attribution_figure


def make(run, out):
    attribution = read(run, "attribution.json")
    written = write(print_style(attribution_figure(attribution), font=8), out, "attribution",
                    width=TWO_COLUMN, height=280)
    if attribution.get("heads"):
        written += write(print_style(head_attribution_figure(attribution), font=8), out, "attribution_heads",
                         width=ONE_COLUMN, height=360)
    return written


if __name__ == "__main__":
    args = arguments(__doc__)
    print("\n".join(map(str, make(args.run, args.out))))
