import pytest
import torch

from safereact_interp.diagnose import (DiagnoseConfig, Diagnosis, LayerMetrics, VerdictThresholds, decide_verdict,
                                       diagnose, rank_layers)
from safereact_interp.errors import ConfigError
from safereact_interp.models import load_pair
from safereact_interp.prompts import EvalPrompts
from safereact_interp.scoring import GenerationConfig

SMALL = dict(n_train=12, n_val=8, n_test=6)
FAST = DiagnoseConfig(generation=GenerationConfig(max_new_tokens=4, capability_max_new_tokens=6))


@pytest.fixture(scope="module")
def self_diagnosis(tiny_model_dir):
    pair = load_pair(str(tiny_model_dir), str(tiny_model_dir), dtype="float32", device="cpu")
    return diagnose(pair, EvalPrompts.bundled(**SMALL), FAST).diagnosis


def test_self_similarity_one(self_diagnosis):
    assert self_diagnosis.metrics.direction_similarity == pytest.approx([1.0] * 4, abs=1e-5)


def test_self_amplification_and_masking_one(self_diagnosis):
    assert self_diagnosis.metrics.amplification == pytest.approx([1.0] * 4, abs=1e-5)
    assert self_diagnosis.metrics.masking == pytest.approx([1.0] * 4, abs=1e-5)
    assert self_diagnosis.metrics.capability_amplification == pytest.approx([1.0] * 4, abs=1e-5)


def test_self_verdict_intact(self_diagnosis):
    assert self_diagnosis.verdict == "intact"
    assert self_diagnosis.metrics.separability_base == pytest.approx(self_diagnosis.metrics.separability_post)


def test_roundtrip(self_diagnosis):
    assert Diagnosis.from_dict(self_diagnosis.to_dict()) == self_diagnosis


def metrics(similarity, separability, masking):
    n = len(similarity)
    filler = [0.5] * n
    return LayerMetrics(layers=list(range(n)), direction_similarity=similarity, separability_base=[1.0] * n,
                        separability_post=separability, probe_accuracy_base=filler, probe_accuracy_post=filler,
                        probe_transfer=filler, amplification=[2.0] * n, capability_amplification=[3.0] * n,
                        safety_signal_share_base=filler, safety_signal_share_post=filler, masking=masking,
                        direction_norm_base=filler, direction_norm_post=filler, mean_norm_base=filler,
                        mean_norm_post=filler)


RATES_DROPPED = {"base": {"harmful": 0.95}, "post": {"harmful": 0.1}}


def test_verdict_masked():
    verdict, reasons, numbers = decide_verdict(metrics([0.9] * 6, [0.95] * 6, [0.5] * 6), RATES_DROPPED, 6)
    assert verdict == "masked"
    assert numbers["refusal_drop"] == pytest.approx(0.85)


def test_verdict_removed():
    verdict, reasons, _ = decide_verdict(metrics([0.1] * 6, [0.55] * 6, [0.2] * 6), RATES_DROPPED, 6)
    assert verdict == "removed"
    assert any("0.10" in reason for reason in reasons)


def test_verdict_ignores_early_layers():
    similarity = [0.0, 0.0, 0.9, 0.9, 0.9, 0.9]
    verdict, _, numbers = decide_verdict(metrics(similarity, [0.95] * 6, [0.5] * 6), RATES_DROPPED, 6)
    assert numbers["from_layer"] == 2
    assert verdict == "masked"


def test_threshold_out_of_range():
    with pytest.raises(ConfigError, match="must lie in 0..1"):
        VerdictThresholds(similarity=1.5)


def test_ranking_prefers_masked_layers():
    scores, ranking = rank_layers(metrics([0.9, 0.9, 0.9], [0.95, 0.95, 0.95], [1.0, 0.4, 0.7]))
    assert ranking == [1, 2, 0]
    assert scores[0] == 0.0


def test_planted_pair_amplified(planted_pair):
    result = diagnose(planted_pair, EvalPrompts.bundled(**SMALL), FAST)
    amplification = result.diagnosis.metrics.amplification
    assert amplification[0] == pytest.approx(1.0, abs=1e-5)
    assert amplification[-1] > 1.05
    assert torch.allclose(result.safety_base.vectors[0], result.safety_post.vectors[0], atol=1e-5)
