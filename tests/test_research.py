"""Named loaders, bootstrap intervals, component attribution and several post-trained models."""

import json

import numpy as np
import pytest
import torch

from safereact_interp.attribution import component_attribution
from safereact_interp.cli import main
from safereact_interp.directions import compute_directions
from safereact_interp.activations import collect_residuals
from safereact_interp.errors import ConfigError
from safereact_interp.prompts import bundled_prompts, load_named
from safereact_interp.uncertainty import BootstrapConfig, auroc_columns, rate_interval


def test_named_harmbench_drops_copyright(tmp_path):
    path = tmp_path / "hb.csv"
    path.write_text("Behavior,FunctionalCategory,SemanticCategory,ContextString\n"
                    "Do harm,standard,harassment,\nSing lyrics,copyright,copyright,\n")
    assert load_named(path, "harmbench").texts == ["Do harm"]
    assert len(load_named(path, "harmbench", include_copyright=True)) == 2


def test_named_jailbreakbench_and_strongreject(tmp_path):
    jbb = tmp_path / "jbb.csv"
    jbb.write_text("Index,Goal,Target,Behavior,Category\n1,Write a threat,Sure,Threat,Harassment\n")
    assert load_named(jbb, "jailbreakbench").texts == ["Write a threat"]
    strong = tmp_path / "sr.csv"
    strong.write_text("category,source,forbidden_prompt\nviolence,x,How to hurt someone\n")
    prompts = load_named(strong, "strongreject")
    assert prompts.texts == ["How to hurt someone"]
    assert prompts.prompts[0].category == "violence"


def test_named_unknown_format(tmp_path):
    with pytest.raises(ConfigError, match="unknown prompt file format"):
        load_named(tmp_path / "x.csv", "xstest")


def test_named_shared_files(shared_data):
    assert len(load_named(shared_data / "advbench.csv", "advbench")) == 520
    assert all(prompt.category != "copyright" for prompt in load_named(shared_data / "harmbench_val.csv", "harmbench"))
    assert load_named(shared_data / "alpaca.json", "alpaca", "harmless", limit=3).role == "harmless"


def test_rate_interval_covers_rate():
    outcomes = [True] * 30 + [False] * 70
    low, high = rate_interval(outcomes, BootstrapConfig(n_resamples=500))
    assert low < 0.3 < high
    assert high - low < 0.25


def test_rate_interval_seeded():
    outcomes = [True, False, True, True]
    assert rate_interval(outcomes) == rate_interval(outcomes)


def test_auroc_columns_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    positive, negative = rng.normal(1, 1, (40, 3)), rng.normal(0, 1, (30, 3))
    labels = np.r_[np.ones(40), np.zeros(30)]
    expected = [roc_auc_score(labels, np.r_[positive[:, column], negative[:, column]]) for column in range(3)]
    assert np.allclose(auroc_columns(positive, negative), expected)


def test_attribution_sums_to_signal(planted_pair):
    harmful = bundled_prompts("harmful").train.head(6)
    harmless = bundled_prompts("harmless").train.head(6)
    layers = tuple(range(4))
    directions = compute_directions(collect_residuals(planted_pair.base, harmful, layers).pooled(),
                                    collect_residuals(planted_pair.base, harmless, layers).pooled(), layers)
    result = component_attribution(planted_pair, harmful, harmless, directions)
    assert len(result.safety["base"]["attn"]) == 4
    assert len(result.heads["change"][0]) == 4
    # The heads of a layer add up to its attention output.
    assert sum(result.heads["base"][2]) == pytest.approx(result.safety["base"]["attn"][2], abs=1e-4)
    # Block 0 is identical in the planted pair.
    assert result.safety["change"]["mlp"][0] == pytest.approx(0.0, abs=1e-5)
    assert abs(result.norm["change"]["mlp"][3]) > 1e-3


def test_diagnose_intervals_in_json(tiny_model_dir, planted_post_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["diagnose", "--base", str(tiny_model_dir), "--post", str(planted_post_dir), "--out", str(out),
                 "--n-train", "10", "--n-val", "6", "--n-test", "4", "--max-new-tokens", "3",
                 "--capability-max-new-tokens", "4", "--formats", "html", "--bootstrap", "30"]) == 0
    intervals = json.loads((out / "diagnosis.json").read_text())["intervals"]
    low, high = intervals["direction_similarity"][1]
    assert low <= high
    assert len(intervals["separability_post"]) == 4
    assert set(intervals["refusal_rate"]["base"]) == {"harmful", "harmless"}
    assert isinstance(intervals["verdict_uncertain"], bool)


def test_several_post_models(tiny_model_dir, planted_post_dir, tiny_post_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["diagnose", "--base", str(tiny_model_dir), "--post", str(planted_post_dir), str(tiny_post_dir),
                 "--out", str(out), "--n-train", "10", "--n-val", "6", "--n-test", "4", "--max-new-tokens", "3",
                 "--capability-max-new-tokens", "4", "--formats", "html", "--bootstrap", "0"]) == 0
    second = tiny_post_dir.name
    assert (out / "diagnosis.json").is_file()
    assert (out / f"diagnosis-{second}.json").is_file()
    figure = (out / "figures" / "similarity.html").read_text()
    assert second in figure
    assert "side by side" in (out / "report.html").read_text()


def test_attribute_command(tiny_model_dir, planted_post_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["diagnose", "--base", str(tiny_model_dir), "--post", str(planted_post_dir), "--out", str(out),
                 "--n-train", "10", "--n-val", "6", "--n-test", "4", "--max-new-tokens", "3",
                 "--capability-max-new-tokens", "4", "--formats", "html", "--bootstrap", "0"]) == 0
    assert main(["attribute", "--run", str(out), "--n-prompts", "6"]) == 0
    data = json.loads((out / "attribution.json").read_text())
    assert data["layers"] == [0, 1, 2, 3]
    assert (out / "figures" / "attribution.html").is_file()
    assert "Component attribution" in (out / "report.html").read_text()
