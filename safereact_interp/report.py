"""The run report: one HTML page with every table and figure of a run folder.

The report is rebuilt from the JSON files of the run folder (diagnosis, patching, verification),
so every number it shows is in those files. Figures are embedded as interactive plotly divs that
load one local copy of plotly.js from `figures/`.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Callable, Sequence

from .artifacts import atomic_write_text, read_json
from .plots import figure_html

logger = logging.getLogger(__name__)

_STYLE = """
body { font-family: Arial, Helvetica, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td.left, th.left { text-align: left; }
.verdict { font-size: 1.15em; padding: 0.6em 1em; background: #f5f8fc; border-left: 4px solid #0072B2; }
.note { color: #555; font-size: 0.9em; }
.figure { margin: 1em 0; }
"""


def fmt(value, digits: int = 3) -> str:
    """Format a number for a table cell; lists [low, high] become intervals."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return f"[{value[0]:.{digits}f}, {value[1]:.{digits}f}]"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def table(headers: Sequence[str], rows: Sequence[Sequence], left_columns: int = 1) -> str:
    """Render an HTML table whose first `left_columns` columns are left-aligned."""
    head = "".join(f'<th class="{"left" if index < left_columns else ""}">{html.escape(str(header))}</th>'
                   for index, header in enumerate(headers))
    body = []
    for row in rows:
        cells = "".join(f'<td class="{"left" if index < left_columns else ""}">{fmt(cell)}</td>'
                        for index, cell in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figures_html(figures: dict) -> str:
    return "".join(f'<div class="figure">{figure_html(figure, full_html=False, plotly_js=False)}</div>'
                   for figure in figures.values())


def diagnosis_section(diagnosis: dict, others: dict[str, dict] | None = None) -> str:
    """Verdict, refusal and capability table, per-layer table and figures of a diagnosis."""
    from .diagnose import Diagnosis
    from .plots import diagnosis_figures

    parts = ["<h2>Diagnosis</h2>"]
    parts.append(f'<p class="verdict"><b>Verdict: {html.escape(diagnosis["verdict"])}</b> &mdash; '
                 + "; ".join(html.escape(reason) for reason in diagnosis["verdict_reasons"]) + "</p>")
    rates = diagnosis["refusal_rate"]
    names = list(rates["base"].keys())
    rows = [[model] + [rates[model].get(name) for name in names] + [diagnosis["capability_accuracy"].get(model)]
            for model in ("base", "post")]
    parts.append(table(["model"] + [f"refusal rate: {name}" for name in names] + ["capability accuracy"], rows))
    parts.append('<p class="note">Refusal rates on the test split (and any extra harmful set), as fractions '
                 'of greedy generations judged as refusals; capability accuracy on the capability test split.</p>')

    all_diagnoses = {"post": Diagnosis.from_dict(diagnosis)}
    for name, other in (others or {}).items():
        all_diagnoses[name] = Diagnosis.from_dict(other)
    if len(all_diagnoses) > 1:
        rows = [[name, item.verdict, item.refusal_rate["post"]["harmful"], item.capability_accuracy["post"],
                 sum(item.metrics.direction_similarity) / len(item.layers)]
                for name, item in all_diagnoses.items()]
        parts.append("<h3>Post-trained models side by side</h3>")
        parts.append(table(["model", "verdict", "harmful refusal rate", "capability accuracy",
                            "mean direction similarity"], rows))

    intervals = {name: item.intervals for name, item in all_diagnoses.items() if item.intervals}
    parts.append(_figures_html(diagnosis_figures(all_diagnoses, intervals or None)))

    columns = ["direction_similarity", "separability_base", "separability_post", "probe_accuracy_base",
               "probe_accuracy_post", "probe_transfer", "amplification", "capability_amplification", "masking",
               "layer_scores"]
    rows = [[layer] + [diagnosis[column][index] for column in columns]
            for index, layer in enumerate(diagnosis["layers"])]
    parts.append("<h3>Per-layer metrics</h3>")
    parts.append(table(["layer", "similarity", "AUROC base", "AUROC post", "probe base", "probe post",
                        "probe transfer", "amplification", "capability ampl.", "masking", "rank score"], rows))
    parts.append(f'<p class="note">Layer ranking for repair: {diagnosis["layer_ranking"][:10]} '
                 f'(direction method {html.escape(diagnosis["direction_method"])}, readout positions '
                 f'{diagnosis["positions"]}).</p>')
    return "".join(parts)


def patching_section(patching: dict, run_dir: Path) -> str:
    from .plots import intervention_figure, patching_figure

    selection = patching.get("selection", {})
    parts = ["<h2>Activation patching and interventions</h2>",
             f"<p>{patching['n_prompts']} harmful validation prompts, readout positions {patching['positions']}. "
             f"Mean refusal score: base {patching['score_base']:.3f}, post-trained {patching['score_post']:.3f}.</p>"]
    parts.append(_figures_html({"patching": patching_figure(patching, selection.get("layers", [])),
                                "interventions": intervention_figure(patching)}))
    rows = [[layer, patching["residual_scores"][index], patching["residual_fraction"][index],
             patching["direction_scores"][index], patching["direction_fraction"][index]]
            for index, layer in enumerate(patching["layers"])]
    parts.append(table(["layer", "score (residual patch)", "fraction restored", "score (direction patch)",
                        "fraction restored"], rows))
    ablation = patching["ablation"]
    parts.append(f"<p>Directional ablation of r_base at every layer: base model score {ablation['base']:.3f} "
                 f"({fmt(ablation['base_fraction_removed'])} of the base/post gap removed), post-trained "
                 f"{ablation['post']:.3f}.</p>")
    if selection:
        parts.append(f"<p><b>Layers chosen for the repair: {selection.get('layers')}</b> "
                     f"({html.escape(str(selection.get('rule', '')))}).</p>")
    return "".join(parts)


def repair_section(repair: dict, run_dir: Path) -> str:
    import json

    from .plots import training_figure

    parts = ["<h2>Repair</h2>"]
    config = dict(repair["repair"])
    # Unset settings show the value used: adapter_layers lists the LoRA layers, positions were resolved.
    if config.get("lora_layers") is None:
        config.pop("lora_layers", None)
    if config.get("positions") is None and repair.get("positions"):
        config["positions"] = f"{repair['positions']} (post-instruction tokens)"
    if config.get("modules") is None:
        config["modules"] = "attention and MLP projections (default)"
    parts.append(table(["setting", "value"], [[key, str(value)] for key, value in config.items()]))
    log_path = run_dir / "repair" / "log.jsonl"
    if log_path.is_file():
        log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        if log:
            parts.append(_figures_html({"training": training_figure(log)}))
    return "".join(parts)


def verification_section(verification: dict, run_dir: Path) -> str:
    from .plots import before_after_figure

    parts = ["<h2>Verification</h2>"]
    models = verification["models"]
    metrics = ["harmful_refusal_rate", "harmful_refusal_rate_advbench", "harmless_refusal_rate",
               "capability_accuracy", "kl_to_post"]
    intervals = verification.get("intervals", {})
    rows = []
    for name, values in models.items():
        row = [name]
        for metric in metrics:
            value = values.get(metric)
            bounds = intervals.get(name, {}).get(metric)
            row.append(f"{value:.3f} [{bounds[0]:.2f}, {bounds[1]:.2f}]" if bounds and value is not None else value)
        rows.append(row)
    parts.append(table(["model", "harmful refusal (test)", "harmful refusal (AdvBench)", "harmless refusal",
                        "capability accuracy", "KL to post-trained"], rows))
    parts.append(_figures_html({"bars": before_after_figure(verification, intervals or None)}))
    scores = verification["refusal_scores"]
    parts.append(
        f"<p>Causal checks (refusal score): patching the repaired model's activations at layers "
        f"{verification['layers']} into the post-trained model restores "
        f"<b>{fmt(verification['fraction_restored_by_patching'])}</b> of the refusal score it regained "
        f"(post {scores['score_post']:.3f}, repaired {scores['score_repaired']:.3f}, patched "
        f"{scores['score_patched']:.3f}); ablating the base safety direction in the repaired model removes "
        f"<b>{fmt(verification['ablation_refusal_drop'])}</b> of it (ablated {scores['score_repaired_ablated']:.3f}).</p>")
    parts.append(f"<p>Trainable parameters: {100 * verification['trainable_parameter_fraction']:.2f} % of the model; "
                 f"repair time {verification['repair_seconds']:.0f} s.</p>")
    if verification.get("targets"):
        parts.append(table(["target", "met"], [[key, value] for key, value in verification["targets"].items()]))
    if verification.get("baselines"):
        from .verify import BASELINE_LABELS

        parts.append(table(["comparison", "holds"], [[BASELINE_LABELS.get(key, key), value]
                                                    for key, value in verification["baselines"].items()
                                                    if isinstance(value, bool)]))
    return "".join(parts)


def attribution_section(attribution: dict, run_dir: Path) -> str:
    from .plots import attribution_figure, head_attribution_figure

    figures = {"components": attribution_figure(attribution)}
    if attribution.get("heads"):
        figures["heads"] = head_attribution_figure(attribution)
    parts = ["<h2>Component attribution</h2>",
             "<p>Change (post-trained minus base) of what each block's attention and MLP write along the base "
             "safety direction (harmful minus harmless) and along the residual's own direction (norm).</p>",
             _figures_html(figures)]
    rows = [[layer, attribution["safety"]["change"]["attn"][index], attribution["safety"]["change"]["mlp"][index],
             attribution["norm"]["change"]["attn"][index], attribution["norm"]["change"]["mlp"][index]]
            for index, layer in enumerate(attribution["layers"])]
    parts.append(table(["layer", "Δ safety (attn)", "Δ safety (MLP)", "Δ norm (attn)", "Δ norm (MLP)"], rows))
    if attribution.get("top_heads"):
        parts.append(table(["layer", "head", "Δ safety"], [[head["layer"], head["head"], head["change"]]
                                                          for head in attribution["top_heads"]]))
    return "".join(parts)


# Sections after the diagnosis: JSON file of the run folder -> section builder.
SECTIONS: dict[str, Callable[[dict, Path], str]] = {
    "patching.json": patching_section,
    "repair/config.json": repair_section,
    "verification.json": verification_section,
    "attribution.json": attribution_section,
}


def build_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report.html` from the JSON files the run folder holds."""
    run_dir = Path(run_dir)
    diagnosis_path = run_dir / "diagnosis.json"
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>safereact report</title>",
             f"<style>{_STYLE}</style><script src='figures/plotly.min.js'></script></head><body>",
             "<h1>SafeReAct run report</h1>"]
    if diagnosis_path.is_file():
        diagnosis = read_json(diagnosis_path)
        parts.append(f"<p>Base model: <code>{html.escape(diagnosis['base_model'])}</code>; post-trained model: "
                     f"<code>{html.escape(diagnosis['post_model'])}</code>.</p>")
        others = {}
        for path in sorted(run_dir.glob("diagnosis-*.json")):
            others[path.stem.removeprefix("diagnosis-")] = read_json(path)
        parts.append(diagnosis_section(diagnosis, others))
    for filename, section in SECTIONS.items():
        path = run_dir / filename
        if path.is_file():
            parts.append(section(read_json(path), run_dir))
    parts.append("</body></html>")
    output = run_dir / "report.html"
    atomic_write_text(output, "\n".join(parts))
    return output
