"""The public Python API in one namespace, plus the pipeline in five calls.

    from safereact_interp import api
    pair = api.load_pair("organism:base", "organism:post")
    result = api.diagnose(pair)
    layers = api.choose_layers(pair, result)["layers"]
    repaired = api.repair_pair(pair, result, layers, output="runs/api/repair")
    table = api.verify_repair(pair, repaired, result, layers)
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .activations import ResidualActivations, collect_activations, collect_residuals
from .attribution import Attribution, component_attribution
from .capability import Problem, generate_problems, is_correct
from .diagnose import (DiagnoseConfig, Diagnosis, DiagnosisResult, VerdictThresholds, decide_verdict, diagnose,
                       rank_layers)
from .directions import Directions, compute_directions, cosine_similarity, project
from .errors import (ConfigError, DirectionError, LayerError, ModelLoadError, PairMismatchError, PromptFileError,
                     RunFolderError, SafeReactError, TokenizationMismatchError)
from .judges import ClassifierJudge, GuardJudge, load_judge
from .models import LoadedModel, ModelPair, check_pair, load_model, load_pair
from .patching import (ActivationAddition, DirectionalAblation, DirectionPatch, PatchingResult, ResidualPatch,
                       ablation_of, layer_sweep, select_layers)
from .pipeline import retain_prompts
from .plots import (attribution_figure, before_after_figure, diagnosis_figures, intervention_figure, patching_figure,
                    save_figure, training_figure)
from .prompts import (EvalPrompts, PromptSet, bundled_prompts, load_named, load_prompt_file,
                      post_instruction_positions, render_chat)
from .repair import RepairConfig, RepairResult, repair
from .scoring import (GenerationConfig, ModelEvaluation, RefusalPhraseJudge, RefusalScoreConfig, RefusalScorer,
                      evaluate_model, generate, kl_divergence, refusal_scores)
from .verify import causal_checks, choose_addition, train_refusal_lora


def choose_layers(pair: ModelPair, result: DiagnosisResult, *, k: int = 3, n_prompts: int = 32,
                  prompts: EvalPrompts | None = None) -> dict:
    """Run the activation-patching sweep on harmful validation prompts and choose `k` repair layers.

    Returns the selection (`layers`, `combined_scores`, `rule`) with the sweep under `patching`.
    """
    prompts = prompts or EvalPrompts.bundled()
    harmful = prompts.harmful_val.head(min(n_prompts, len(prompts.harmful_val)))
    sweep = layer_sweep(pair, harmful, result.safety_base, positions=post_instruction_positions(pair.base.tokenizer))
    selection = select_layers(sweep, result.diagnosis.layer_scores, result.diagnosis.layers, k=k,
                              n_layers=pair.base.n_layers)
    return {**selection, "patching": sweep}


def repair_pair(pair: ModelPair, result: DiagnosisResult, layers: Sequence[int], *, output: str | Path,
                prompts: EvalPrompts | None = None, **settings) -> RepairResult:
    """SafeReAct repair of the post-trained model on `layers`; `settings` are `RepairConfig` fields."""
    prompts = prompts or EvalPrompts.bundled()
    config = RepairConfig(layers=tuple(layers), **settings)
    return repair(pair.base, pair.post.spec, prompts.harmful_train, retain_prompts(prompts), config,
                  output=Path(output), post=pair.post, post_adapter=pair.post.adapter,
                  base_directions=result.safety_base)


def verify_repair(pair: ModelPair, repaired: RepairResult, result: DiagnosisResult, layers: Sequence[int], *,
                  prompts: EvalPrompts | None = None, generation: GenerationConfig = GenerationConfig(),
                  n_prompts: int = 32) -> dict:
    """Refusal rates, capability accuracy and KL of the repaired model next to the base and post-trained
    models (reusing the diagnosis's evaluations), and the two causal checks."""
    prompts = prompts or EvalPrompts.bundled()
    sets = {"harmful": prompts.harmful_test, "harmless": prompts.harmless_test, **prompts.harmful_extra}
    rows = {}
    for name in ("base", "post"):
        evaluation = result.evaluations[name]
        rows[name] = {"refusal_rate": evaluation.refusal_rate, "capability_accuracy": evaluation.capability_accuracy}
    evaluation = evaluate_model(repaired.model, sets, prompts.capability_test, generation=generation, name="repaired")
    harmless = prompts.harmless_test.head(48)
    rows["repaired"] = {"refusal_rate": evaluation.refusal_rate, "capability_accuracy": evaluation.capability_accuracy,
                        "kl_to_post": kl_divergence(repaired.model, pair.post, harmless)}
    harmful = prompts.harmful_val.head(min(n_prompts, len(prompts.harmful_val)))
    checks = causal_checks(pair.post, repaired.model, harmful, layers,
                           post_instruction_positions(pair.base.tokenizer), result.safety_base)
    return {"models": rows, **checks}
