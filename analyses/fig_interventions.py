"""Directional ablation and activation addition: refusal score against the addition scale alpha."""

from common import ONE_COLUMN, arguments, print_style, read, write

from safereact_interp.plots import intervention_figure


def make(run, out):
    figure = print_style(intervention_figure(read(run, "patching.json")), font=8)
    figure.update_layout(legend=dict(orientation="h", y=-0.35, x=0, xanchor="left"))
    return write(figure, out, "interventions", width=ONE_COLUMN, height=340)


if __name__ == "__main__":
    args = arguments(__doc__)
    print("\n".join(map(str, make(args.run, args.out))))
