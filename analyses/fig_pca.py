"""PCA of harmful vs harmless activations in the base, post-trained and repaired models: an interactive
figure with a slider over layers, and a static panel of chosen layers for print."""

from common import TWO_COLUMN, arguments, print_style, read, write

from safereact_interp.artifacts import load_tensors
from safereact_interp.plots import pca_coordinates, pca_panel_figure, pca_slider_figure, save_figure


def make(run, out):
    diagnosis = read(run, "diagnosis.json")
    selection = read(run, "patching.json")["selection"]["layers"]
    base_post = load_tensors(run / "activations.safetensors")
    repaired = load_tensors(run / "activations-repaired.safetensors")
    activations = {"base": (base_post["base_harmful_val"], base_post["base_harmless_val"]),
                   "post": (base_post["post_harmful_val"], base_post["post_harmless_val"]),
                   "repaired": (repaired["harmful_val"], repaired["harmless_val"])}
    layers = diagnosis["layers"]
    coordinates = pca_coordinates(activations)
    written = save_figure(pca_slider_figure(coordinates, layers), out, "pca_layers", formats=("html",))
    n_layers = len(layers)
    chosen = sorted({layers[n_layers // 4], selection[0], selection[-1], layers[-1]})
    panel = print_style(pca_panel_figure(coordinates, layers, chosen), font=8)
    written += write(panel, out, "pca_panel", width=TWO_COLUMN, height=420)
    return written


if __name__ == "__main__":
    args = arguments(__doc__)
    print("\n".join(map(str, make(args.run, args.out))))
