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
    """An HTML table; the first `left_columns` columns are left-aligned."""
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


# Later stages register their report sections here: name of the JSON file -> section builder.
SECTIONS: dict[str, Callable[[dict, Path], str]] = {}


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
