"""Plotly figures with one theme, a colour-blind-safe palette and HTML + PNG/SVG/PDF export.

Every figure function returns a `plotly.graph_objects.Figure`. `save_figure` writes it as
interactive HTML, with one local copy of plotly.js per folder so the files open offline, and as
static images through kaleido, which needs a Chrome or Chromium browser on the machine.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import plotly.graph_objects as go
import plotly.io as pio

from .artifacts import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor

logger = logging.getLogger(__name__)

# Okabe-Ito palette: distinguishable under the common colour-vision deficiencies.
PALETTE = {
    "base": "#0072B2", "post": "#D55E00", "repaired": "#009E73", "activation_addition": "#CC79A7",
    "refusal_lora": "#E69F00", "other": "#56B4E9", "neutral": "#999999", "dark": "#000000",
    "yellow": "#F0E442",
}
SEQUENCE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
LABELS = {"base": "base model", "post": "post-trained model", "repaired": "repaired model",
          "activation_addition": "activation addition", "refusal_lora": "refusal LoRA"}
# Widths in pixels for one-column and two-column paper layouts (at 96 px per inch: 3.5 in and 7 in);
# PNG export doubles the pixel density.
ONE_COLUMN = (336 * 2, 260 * 2)
TWO_COLUMN = (672 * 2, 300 * 2)
DEFAULT_SIZE = (760, 440)
_warned_no_browser = False
_export_server_started = False


def _start_export_server() -> None:
    """Start one kaleido browser for every static export of this process, which saved about 2 s per
    figure on 2 CPU cores. The browser stops when the process exits."""
    global _export_server_started
    if _export_server_started:
        return
    _export_server_started = True
    try:
        import atexit

        import kaleido

        kaleido.start_sync_server(silence_warnings=True)
        atexit.register(kaleido.stop_sync_server, silence_warnings=True)
    except Exception as error:  # no browser: each export then fails and is reported below
        logger.debug("kaleido export server not started: %s", error)

TEMPLATE = go.layout.Template(
    layout=go.Layout(
        font=dict(family="Arial, Helvetica, sans-serif", size=13, color="#222222"),
        colorway=SEQUENCE,
        plot_bgcolor="white",
        paper_bgcolor="white",
        xaxis=dict(showline=True, linecolor="#444444", ticks="outside", gridcolor="#EEEEEE", zeroline=False),
        yaxis=dict(showline=True, linecolor="#444444", ticks="outside", gridcolor="#EEEEEE", zeroline=False),
        legend=dict(bgcolor="rgba(255,255,255,0.8)", borderwidth=0),
        margin=dict(l=70, r=20, t=60, b=55),
        title=dict(x=0.02, xanchor="left", font=dict(size=15)),
    )
)


def colour(name: str, index: int = 0) -> str:
    return PALETTE.get(name, SEQUENCE[index % len(SEQUENCE)])


def label(name: str) -> str:
    return LABELS.get(name, name)


def _band_colour(hex_colour: str, alpha: float = 0.18) -> str:
    red, green, blue = (int(hex_colour[index:index + 2], 16) for index in (1, 3, 5))
    return f"rgba({red},{green},{blue},{alpha})"


def per_layer_figure(
    layers: Sequence[int],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    y_title: str,
    bands: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    reference: float | None = None,
    reference_label: str | None = None,
    y_range: tuple[float, float] | None = None,
    colours: Mapping[str, str] | None = None,
    dashes: Mapping[str, str] | None = None,
) -> go.Figure:
    """Line per series over layers, with optional confidence bands and a horizontal reference."""
    figure = go.Figure()
    for index, (name, values) in enumerate(series.items()):
        line_colour = (colours or {}).get(name) or colour(name, index)
        if bands and name in bands:
            low, high = bands[name]
            figure.add_trace(go.Scatter(x=list(layers) + list(layers)[::-1], y=list(high) + list(low)[::-1],
                                        fill="toself", fillcolor=_band_colour(line_colour), line=dict(width=0),
                                        hoverinfo="skip", showlegend=False, name=f"{label(name)} 95% CI"))
        figure.add_trace(go.Scatter(x=list(layers), y=list(values), mode="lines+markers", name=label(name),
                                    line=dict(color=line_colour, width=2.2, dash=(dashes or {}).get(name, "solid")),
                                    marker=dict(size=5)))
    if reference is not None:
        annotation = dict(annotation_text=reference_label, annotation_position="top left") if reference_label else {}
        figure.add_hline(y=reference, line=dict(color=PALETTE["neutral"], dash="dot", width=1.2), **annotation)
    figure.update_layout(template=TEMPLATE, title=title, width=DEFAULT_SIZE[0], height=DEFAULT_SIZE[1],
                         xaxis_title="layer (residual stream after block)", yaxis_title=y_title,
                         legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0))
    if y_range is not None:
        figure.update_yaxes(range=list(y_range))
    return figure


def grouped_bars(categories: Sequence[str], groups: Mapping[str, Sequence[float]], *, title: str, y_title: str,
                 errors: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                 y_range: tuple[float, float] | None = None) -> go.Figure:
    """Bars per category, one bar per group (model), with optional asymmetric error bars."""
    figure = go.Figure()
    for index, (name, values) in enumerate(groups.items()):
        error_y = None
        if errors and name in errors:
            low, high = errors[name]
            error_y = dict(type="data", symmetric=False,
                           array=[max(0.0, h - v) for h, v in zip(high, values)],
                           arrayminus=[max(0.0, v - l) for l, v in zip(low, values)], thickness=1.2, width=4)
        figure.add_trace(go.Bar(x=list(categories), y=list(values), name=label(name), marker_color=colour(name, index),
                                error_y=error_y, text=[f"{value:.2f}" for value in values], textposition="outside"))
    figure.update_layout(template=TEMPLATE, title=title, barmode="group", width=DEFAULT_SIZE[0],
                         height=DEFAULT_SIZE[1], yaxis_title=y_title,
                         legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0))
    if y_range is not None:
        figure.update_yaxes(range=list(y_range))
    return figure


def _write_plotly_bundle(folder: Path) -> None:
    bundle = folder / "plotly.min.js"
    if not bundle.exists():
        from plotly.offline import get_plotlyjs

        atomic_write_text(bundle, get_plotlyjs())


def figure_html(figure: go.Figure, *, full_html: bool = True, plotly_js: str = "directory") -> str:
    """HTML of a figure; `directory` loads plotly.min.js from the same folder."""
    return pio.to_html(figure, full_html=full_html, include_plotlyjs=plotly_js,
                       config={"displaylogo": False, "toImageButtonOptions": {"scale": 2}})


def save_figure(figure: go.Figure, folder: str | Path, name: str, *,
                formats: Sequence[str] = ("html", "png"), size: tuple[int, int] | None = None) -> list[Path]:
    """Write the figure as `folder/name.<format>` for each format (html, png, svg, pdf).

    Static formats need kaleido's browser; without one they are skipped with a warning naming the
    fix, and the HTML is still written.
    """
    global _warned_no_browser
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = folder / f"{name}.{fmt}"
        if fmt == "html":
            _write_plotly_bundle(folder)
            atomic_write_text(path, figure_html(figure))
            written.append(path)
            continue
        width, height = size or (figure.layout.width or DEFAULT_SIZE[0], figure.layout.height or DEFAULT_SIZE[1])
        try:
            _start_export_server()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The kopts argument is ignored")
                data = pio.to_image(figure, format=fmt, width=width, height=height, scale=2 if fmt == "png" else 1)
        except Exception as error:  # kaleido raises several types when no browser is available
            if not _warned_no_browser:
                logger.warning("could not export %s (%s): %s. Install Chromium (for example "
                               "`apt-get install -y chromium`) for PNG/SVG/PDF figures.", path, fmt, error)
                _warned_no_browser = True
            continue
        atomic_write_bytes(path, data)
        written.append(path)
    return written


# ---- diagnosis figures ------------------------------------------------------------------------

def diagnosis_figures(diagnoses: Mapping[str, "object"], intervals: Mapping[str, dict] | None = None
                      ) -> dict[str, go.Figure]:
    """Per-layer figures of one or more diagnoses against the same base model, keyed by file name.

    `diagnoses` maps a post-trained model's label to its `Diagnosis`; several labels are overlaid.
    `intervals` maps the same labels to bootstrap intervals, drawn as bands.
    """
    many = len(diagnoses) > 1
    first = next(iter(diagnoses.values()))
    layers = first.layers
    figures: dict[str, go.Figure] = {}

    def key(name: str, quantity: str) -> str:
        return f"{quantity} ({name})" if many else quantity

    def band(name: str, metric: str):
        found = (intervals or {}).get(name, {}).get(metric)
        if not found:
            return None
        return [pair[0] for pair in found], [pair[1] for pair in found]

    def post_colour(index: int) -> str:
        return PALETTE["post"] if index == 0 else SEQUENCE[(index + 2) % len(SEQUENCE)]

    series, bands, colours = {}, {}, {}
    for index, (name, diagnosis) in enumerate(diagnoses.items()):
        series_name = name if many else "cos(r_base, r_post)"
        series[series_name] = diagnosis.metrics.direction_similarity
        colours[series_name] = post_colour(index)
        if band(name, "direction_similarity"):
            bands[series_name] = band(name, "direction_similarity")
    figures["similarity"] = per_layer_figure(
        layers, series, bands=bands, colours=colours, title="Safety direction similarity, base vs post-trained",
        y_title="cosine similarity", y_range=(-0.05, 1.05), reference=0.0)

    series, bands, colours = {"base": first.metrics.separability_base}, {}, {"base": PALETTE["base"]}
    if band(next(iter(diagnoses)), "separability_base"):
        bands["base"] = band(next(iter(diagnoses)), "separability_base")
    for index, (name, diagnosis) in enumerate(diagnoses.items()):
        series_name = key(name, "post") if many else "post"
        series[series_name] = diagnosis.metrics.separability_post
        colours[series_name] = post_colour(index)
        if band(name, "separability_post"):
            bands[series_name] = band(name, "separability_post")
    figures["separability"] = per_layer_figure(
        layers, series, bands=bands, colours=colours,
        title="Separability of harmful vs harmless along the base safety direction",
        y_title="AUROC of projection on r̂_base", y_range=(0.4, 1.02), reference=0.5, reference_label="chance")

    series, colours, dashes = {}, {}, {}
    for index, (name, diagnosis) in enumerate(diagnoses.items()):
        norm_name = key(name, "activation norm ratio") if many else "activation norm ratio"
        capability_name = key(name, "capability direction ratio") if many else "capability direction ratio"
        series[norm_name] = diagnosis.metrics.amplification
        series[capability_name] = diagnosis.metrics.capability_amplification
        colours[norm_name] = colours[capability_name] = post_colour(index)
        dashes[capability_name] = "dash"
    figures["amplification"] = per_layer_figure(
        layers, series, colours=colours, dashes=dashes, title="Amplification by post-training",
        y_title="post-trained / base (ratio)", reference=1.0, reference_label="no change")

    series, colours = {}, {}
    for index, (name, diagnosis) in enumerate(diagnoses.items()):
        series_name = name if many else "masking m = q_post / q_base"
        series[series_name] = diagnosis.metrics.masking
        colours[series_name] = post_colour(index)
    figures["masking"] = per_layer_figure(
        layers, series, colours=colours, title="Masking of the safety signal (below 1: masked)",
        y_title="safety signal share ratio", reference=1.0, reference_label="unmasked")
    return figures


# ---- patching, repair and verification figures -------------------------------------------------

def patching_figure(patching: Mapping, selected: Sequence[int] = ()) -> go.Figure:
    """Fraction of the refusal score restored by patching base -> post-trained at each layer."""
    layers = patching["layers"]
    figure = per_layer_figure(
        layers, {"residual stream patched": patching["residual_fraction"],
                 "safety direction component patched": patching["direction_fraction"]},
        colours={"residual stream patched": PALETTE["base"], "safety direction component patched": PALETTE["other"]},
        dashes={"safety direction component patched": "dash"},
        title="Activation patching base → post-trained at the readout positions",
        y_title="fraction of refusal score restored", reference=0.0)
    figure.add_hline(y=1.0, line=dict(color=PALETTE["neutral"], dash="dot", width=1.2),
                     annotation_text="base model", annotation_position="bottom left")
    for layer in selected:
        figure.add_vline(x=layer, line=dict(color=PALETTE["repaired"], width=1.5, dash="dot"))
    if selected:
        figure.add_annotation(x=max(selected), y=0.02, yref="paper", text="chosen for repair ", showarrow=False,
                              font=dict(color=PALETTE["repaired"]), xanchor="right", yanchor="bottom")
    return figure


def intervention_figure(patching: Mapping) -> go.Figure:
    """Refusal score under activation addition of alpha * r_base (swept) and under directional ablation."""
    addition = patching["addition"]
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=addition["alphas"], y=addition["scores"], mode="lines+markers",
                                name=f"post-trained + α·r_base at layer {addition['layer']}",
                                line=dict(color=PALETTE["activation_addition"], width=2.2)))
    references = [("base model", patching["score_base"], PALETTE["base"], "dot"),
                  ("post-trained model", patching["score_post"], PALETTE["post"], "dot"),
                  ("base model, direction ablated", patching["ablation"]["base"], PALETTE["base"], "dash"),
                  ("post-trained, direction ablated", patching["ablation"]["post"], PALETTE["post"], "dash")]
    for name, value, line_colour, dash in references:
        figure.add_trace(go.Scatter(x=[min(addition["alphas"]), max(addition["alphas"])], y=[value, value],
                                    mode="lines", name=name, line=dict(color=line_colour, dash=dash, width=1.5)))
    figure.update_layout(template=TEMPLATE, title="Activation addition and directional ablation",
                         xaxis_title="α (multiples of the base safety direction r_base)",
                         yaxis_title="refusal score (nats)",
                         width=DEFAULT_SIZE[0], height=DEFAULT_SIZE[1])
    return figure


def training_figure(log: Sequence[Mapping]) -> go.Figure:
    """Alignment and retain losses over repair steps (log scale)."""
    steps = [entry["step"] for entry in log]
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=steps, y=[entry["align_loss"] for entry in log], name="alignment loss (harmful)",
                                mode="lines", line=dict(color=PALETTE["repaired"], width=2.2)))
    figure.add_trace(go.Scatter(x=steps, y=[entry["retain_loss"] for entry in log], name="retain loss (harmless + capability)",
                                mode="lines", line=dict(color=PALETTE["post"], width=2.2, dash="dash")))
    figure.update_layout(template=TEMPLATE, title="SafeReAct repair: training losses", xaxis_title="training step",
                         yaxis_title="loss (normalised squared distance)", yaxis_type="log",
                         width=DEFAULT_SIZE[0], height=DEFAULT_SIZE[1],
                         legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0))
    # The retain loss starts at rounding level (about 1e-12) because LoRA starts as the identity; a
    # log axis down to that value would flatten every later step, so the axis starts at 1 % of the
    # smallest loss after the first step.
    later = [entry[key] for entry in log[1:] for key in ("align_loss", "retain_loss") if entry[key] > 0]
    if later:
        highest = max(entry[key] for entry in log for key in ("align_loss", "retain_loss"))
        figure.update_yaxes(range=[math.log10(min(later) / 100), math.log10(highest * 2)])
    return figure


VERIFY_METRICS = {"harmful_refusal_rate": "harmful refused (test)",
                  "harmful_refusal_rate_advbench": "harmful refused (AdvBench)",
                  "harmless_refusal_rate": "harmless refused",
                  "capability_accuracy": "capability accuracy"}


def before_after_figure(verification: Mapping, intervals: Mapping | None = None) -> go.Figure:
    """Grouped bars of refusal rates and capability accuracy per model."""
    models = verification["models"]
    metrics = [key for key in VERIFY_METRICS
               if any(models[name].get(key) is not None for name in models)]
    groups = {name: [models[name].get(key) or 0.0 for key in metrics] for name in models}
    errors = None
    if intervals:
        errors = {}
        for name in models:
            bounds = [intervals.get(name, {}).get(key) for key in metrics]
            if all(bounds):
                errors[name] = ([bound[0] for bound in bounds], [bound[1] for bound in bounds])
    figure = grouped_bars([VERIFY_METRICS[key] for key in metrics], groups, errors=errors or None,
                          title="Before and after the repair", y_title="fraction of prompts", y_range=(0, 1.12))
    figure.update_traces(textfont_size=10)
    if errors:
        # Value labels would sit on the error bars; the values are in the verification table.
        figure.update_traces(text=None, texttemplate=None)
    return figure


def attribution_figure(attribution: Mapping) -> go.Figure:
    """Change (post-trained - base) of each component's contribution to the safety signal and to the norm."""
    from plotly.subplots import make_subplots

    layers = attribution["layers"]
    figure = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=(
        "safety signal along r̂_base (change)", "contribution to the residual norm (change)"))
    styles = {"attn": ("attention output", PALETTE["base"]), "mlp": ("MLP output", PALETTE["post"])}
    for component, (name, line_colour) in styles.items():
        figure.add_trace(go.Bar(x=layers, y=attribution["safety"]["change"][component], name=name,
                                marker_color=line_colour, legendgroup=component), row=1, col=1)
        figure.add_trace(go.Bar(x=layers, y=attribution["norm"]["change"][component], name=name,
                                marker_color=line_colour, legendgroup=component, showlegend=False), row=1, col=2)
    figure.update_layout(template=TEMPLATE, barmode="group", width=1000,
                         height=DEFAULT_SIZE[1], title="Component attribution: post-trained minus base model",
                         legend=dict(orientation="h", yanchor="bottom", y=1.08, xanchor="right", x=1.0))
    figure.update_xaxes(title_text="layer", row=1, col=1)
    figure.update_xaxes(title_text="layer", row=1, col=2)
    figure.update_yaxes(title_text="Δ projection (residual units)", row=1, col=1)
    figure.update_yaxes(title_text="Δ norm contribution (residual units)", row=1, col=2)
    # make_subplots writes subplot titles as annotations with a fixed 16 px font.
    figure.update_annotations(font_size=12)
    return figure


def head_attribution_figure(attribution: Mapping) -> go.Figure:
    """Heatmap of the change of every head's contribution to the safety signal."""
    change = attribution["heads"]["change"]
    limit = max(abs(value) for row in change for value in row) or 1.0
    figure = go.Figure(go.Heatmap(z=change, x=list(range(len(change[0]))), y=attribution["layers"],
                                  colorscale="RdBu", zmid=0, zmin=-limit, zmax=limit,
                                  colorbar=dict(title="Δ projection")))
    figure.update_layout(template=TEMPLATE, title="Attention heads: change of the safety-signal contribution",
                         xaxis_title="head", yaxis_title="layer", width=DEFAULT_SIZE[0], height=DEFAULT_SIZE[1] + 120)
    return figure


# ---- PCA of harmful and harmless activations ------------------------------------------------------

def pca_coordinates(activations: Mapping[str, tuple["Tensor", "Tensor"]], reference: str = "base"
                    ) -> dict[str, list[tuple["np.ndarray", "np.ndarray"]]]:
    """2-D coordinates per model and layer: each model's activations divided by its mean norm at that
    layer, projected on the top two principal components of the `reference` model's activations.

    `activations[model] = (harmful, harmless)`, each (prompt, layer, d_model). Returns
    `coordinates[model][layer_index] = (harmful_xy, harmless_xy)`.
    """
    import numpy as np

    n_layers = activations[reference][0].shape[1]
    coordinates: dict[str, list] = {name: [] for name in activations}
    for layer in range(n_layers):
        normalised = {}
        for name, (harmful, harmless) in activations.items():
            both = np.concatenate([harmful[:, layer].numpy(), harmless[:, layer].numpy()])
            scale = np.linalg.norm(both, axis=-1).mean()
            normalised[name] = (harmful[:, layer].numpy() / scale, harmless[:, layer].numpy() / scale)
        fit = np.concatenate(normalised[reference])
        centre = fit.mean(axis=0)
        _, _, components = np.linalg.svd(fit - centre, full_matrices=False)
        basis = components[:2].T
        for name, (harmful, harmless) in normalised.items():
            coordinates[name].append(((harmful - centre) @ basis, (harmless - centre) @ basis))
    return coordinates


def pca_slider_figure(coordinates: Mapping[str, list], layers: Sequence[int]) -> go.Figure:
    """Interactive PCA scatter, one column per model, with a slider over layers."""
    from plotly.subplots import make_subplots

    models = list(coordinates)
    figure = make_subplots(rows=1, cols=len(models), subplot_titles=[label(name) for name in models],
                           horizontal_spacing=0.06)
    for layer_index in range(len(layers)):
        for column, name in enumerate(models, start=1):
            harmful, harmless = coordinates[name][layer_index]
            for points, kind, marker_colour in ((harmless, "harmless", PALETTE["base"]),
                                                (harmful, "harmful", PALETTE["post"])):
                figure.add_trace(go.Scatter(x=points[:, 0], y=points[:, 1], mode="markers", name=kind,
                                            marker=dict(color=marker_colour, size=5, opacity=0.7),
                                            legendgroup=kind, showlegend=(column == 1),
                                            visible=(layer_index == len(layers) - 1)), row=1, col=column)
    per_layer = 2 * len(models)
    steps = []
    for layer_index, layer in enumerate(layers):
        visible = [False] * (per_layer * len(layers))
        visible[layer_index * per_layer:(layer_index + 1) * per_layer] = [True] * per_layer
        steps.append(dict(method="update", args=[{"visible": visible}], label=str(layer)))
    figure.update_layout(template=TEMPLATE, width=1100, height=460,
                         title="PCA of harmful vs harmless activations (base model's top two components)",
                         sliders=[dict(active=len(layers) - 1, steps=steps, currentvalue=dict(prefix="layer "),
                                       pad=dict(t=40))])
    figure.update_xaxes(title_text="PC 1 (activation / mean norm)")
    figure.update_yaxes(title_text="PC 2", col=1)
    figure.update_annotations(font_size=12)
    return figure


def pca_panel_figure(coordinates: Mapping[str, list], layers: Sequence[int], chosen: Sequence[int]) -> go.Figure:
    """Static grid for print: one row per model, one column per chosen layer."""
    from plotly.subplots import make_subplots

    models = list(coordinates)
    figure = make_subplots(rows=len(models), cols=len(chosen), horizontal_spacing=0.04, vertical_spacing=0.07,
                           column_titles=[f"layer {layer}" for layer in chosen],
                           row_titles=[label(name).removesuffix(" model") for name in models])
    for row, name in enumerate(models, start=1):
        for column, layer in enumerate(chosen, start=1):
            harmful, harmless = coordinates[name][list(layers).index(layer)]
            for points, kind, marker_colour in ((harmless, "harmless", PALETTE["base"]),
                                                (harmful, "harmful", PALETTE["post"])):
                figure.add_trace(go.Scatter(x=points[:, 0], y=points[:, 1], mode="markers", name=kind,
                                            marker=dict(color=marker_colour, size=3, opacity=0.7), legendgroup=kind,
                                            showlegend=(row == 1 and column == 1)), row=row, col=column)
    figure.update_xaxes(showticklabels=False)
    figure.update_yaxes(showticklabels=False)
    for column in range(1, len(chosen) + 1):
        figure.update_xaxes(title_text="PC 1 (activation / mean norm)", row=len(models), col=column)
    for row in range(1, len(models) + 1):
        figure.update_yaxes(title_text="PC 2", row=row, col=1)
    # make_subplots writes row and column titles as annotations with a fixed 16 px font.
    figure.update_annotations(font_size=11)
    figure.update_layout(template=TEMPLATE, width=TWO_COLUMN[0] // 2, height=150 * len(models) + 90,
                         title="PCA of harmful vs harmless activations", font=dict(size=10),
                         legend=dict(orientation="h", yanchor="bottom", y=1.04, xanchor="right", x=1.0),
                         margin=dict(l=40, r=40, t=80, b=40))
    return figure


def paper_size(figure: go.Figure, columns: int = 1) -> go.Figure:
    """Set a figure to one-column (3.5 in) or two-column (7 in) width for print, with matching fonts."""
    width = 336 if columns == 1 else 672
    height = int(width * (0.72 if columns == 1 else 0.42))
    figure.update_layout(width=width, height=max(height, figure.layout.height or 0) if columns == 2 else height,
                         font=dict(size=9 if columns == 1 else 10), margin=dict(l=50, r=10, t=45, b=40),
                         title=dict(font=dict(size=10 if columns == 1 else 12)))
    return figure
