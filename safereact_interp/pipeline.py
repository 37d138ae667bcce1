"""The pipeline as named stages over a run folder: diagnose, patch, repair, verify.

Each stage reads what earlier stages wrote into the run folder (`config.json`, `diagnosis.json`,
`patching.json`, `repair/`), writes its own JSON (and safetensors) atomically, and refreshes
`report.html`, so any stage can be rerun alone. `RunOptions` contains every setting of a run. It is
saved as `config.json`, and later stages read it to find the models and prompts again.
"""

from __future__ import annotations

import logging
import random
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .artifacts import (prepare_new_folder, publish_folder, read_json, save_tensors, staging_folder,
                        write_json)
from .diagnose import DiagnoseConfig, Diagnosis, DiagnosisResult, VerdictThresholds, diagnose, refusal_sets
from .errors import ConfigError, RunFolderError
from .models import ModelPair, load_model, check_pair
from .parallel import FinishedJob, SideJob, can_fork, side_job
from .plots import diagnosis_figures, save_figure
from .progress import ProgressFactory, no_progress
from .prompts import EvalPrompts, PromptSet, PromptSplits, bundled_prompts, load_named, load_prompt_file
from .report import build_report
from .scoring import GenerationConfig, ModelEvaluation

logger = logging.getLogger(__name__)

# Fractions of a user's prompt file that go to train and val; the rest is the test split.
FILE_SPLIT = (0.5, 0.15)
FILE_SPLIT_SEED = 20240611


@dataclass
class RunOptions:
    """Every setting of a run, saved as the run folder's config.json."""

    base: str = "organism:base"
    posts: list[str] = field(default_factory=lambda: ["organism:post"])
    base_adapter: str | None = None
    post_adapter: str | None = None
    dtype: str = "auto"
    device: str | None = None
    device_map: str | None = None
    trust_remote_code: bool = False
    harmful_file: str | None = None
    harmless_file: str | None = None
    column: str | None = None
    extra_harmful: list[str] = field(default_factory=list)
    extra_limit: int | None = 100
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    layers: list[int] | None = None
    positions: list[int] = field(default_factory=lambda: [-1])
    method: str = "diff_means"
    refusal_drop: float = 0.25
    similarity_threshold: float = 0.5
    separability_threshold: float = 0.8
    max_new_tokens: int = 24
    capability_max_new_tokens: int = 96
    batch_size: int = 16
    generation_batch_size: int = 128
    system_prompt: str | None = None
    response_prefix: str = ""
    seed: int = 0
    bootstrap: int = 200
    judge: str | None = None
    harmful_format: str = "auto"
    harmless_format: str = "auto"
    formats: list[str] = field(default_factory=lambda: ["html", "png"])
    # activation patching and layer selection
    patch_prompts: int = 24
    refusal_texts: list[str] | None = None
    compliance_texts: list[str] | None = None
    patch_positions: list[int] | None = None
    k: int = 3
    repair_layers: list[int] | None = None
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 4.0, 8.0])
    # repair
    rank: int = 8
    lora_alpha: float = 16.0
    lora_modules: list[str] | None = None
    lora_layers: list[int] | None = None
    steps: int = 120
    repair_batch_size: int = 8
    learning_rate: float = 2e-3
    align_weight: float = 1.0
    retain_weight: float = 10.0
    kl_weight: float = 0.0
    repair_mode: str = "activation"
    checkpoint_every: int = 20
    merge: bool = False
    # verification
    baselines: bool = True
    kl_prompts: int = 48
    stages: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunOptions:
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    @property
    def generation(self) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=self.max_new_tokens,
                                capability_max_new_tokens=self.capability_max_new_tokens,
                                batch_size=self.generation_batch_size, system_prompt=self.system_prompt,
                                response_prefix=self.response_prefix)

    def diagnose_config(self) -> DiagnoseConfig:
        return DiagnoseConfig(
            layers=tuple(self.layers) if self.layers else None, positions=tuple(self.positions),
            method=self.method, generation=self.generation, batch_size=self.batch_size, seed=self.seed,
            bootstrap=self.bootstrap,
            thresholds=VerdictThresholds(refusal_drop=self.refusal_drop, similarity=self.similarity_threshold,
                                         separability=self.separability_threshold))


def split_prompt_set(prompts: PromptSet, seed: int = FILE_SPLIT_SEED) -> PromptSplits:
    """Split a user's prompt set into fixed train / val / test parts (50 / 15 / 35 %)."""
    if len(prompts) < 6:
        raise ConfigError(f"prompt file {prompts.source} has {len(prompts)} prompts; at least 6 are needed "
                          "to split it into train, val and test")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    n_train = max(2, int(FILE_SPLIT[0] * len(order)))
    n_val = max(2, int(FILE_SPLIT[1] * len(order)))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return PromptSplits(**{name: PromptSet(prompts.role, tuple(prompts.prompts[index] for index in sorted(indices)),
                                           f"{prompts.source}:{name}") for name, indices in parts.items()})


def extra_set_name(path: str) -> str:
    """Return the name under which an extra harmful file's refusal rate is reported (its file stem)."""
    return Path(path).stem.lower().replace(" ", "_")


def build_prompts(options: RunOptions) -> EvalPrompts:
    """Prompt sets of a run: bundled, or split from the user's files, plus extra harmful sets."""
    harmful = bundled_prompts("harmful")
    harmless = bundled_prompts("harmless")
    if options.harmful_file:
        harmful = split_prompt_set(load_named(options.harmful_file, options.harmful_format, "harmful",
                                              column=options.column))
    if options.harmless_file:
        harmless = split_prompt_set(load_named(options.harmless_file, options.harmless_format, "harmless",
                                               column=options.column))
    extra = {}
    for path in options.extra_harmful:
        extra[extra_set_name(path)] = load_named(path, "auto", "harmful", limit=options.extra_limit)
    capability = bundled_prompts("capability")
    return EvalPrompts(
        harmful_train=harmful.train.head(options.n_train), harmless_train=harmless.train.head(options.n_train),
        # The capability direction needs no more prompts than the safety direction has.
        capability_train=capability.train.head(options.n_train or len(harmful.train)),
        harmful_val=harmful.val.head(options.n_val), harmless_val=harmless.val.head(options.n_val),
        harmful_test=harmful.test.head(options.n_test), harmless_test=harmless.test.head(options.n_test),
        capability_test=capability.test.head(options.n_test), harmful_extra=extra)


def check_inputs(options: RunOptions) -> EvalPrompts:
    """Validate every setting that needs no model, before anything is loaded or written."""
    if not options.posts:
        raise ConfigError("no post-trained model given; pass --post MODEL")
    if len(set(options.posts)) != len(options.posts):
        raise ConfigError(f"post-trained models {options.posts} repeat a model; pass each once")
    if options.method not in ("diff_means", "pca", "probe"):
        raise ConfigError(f"unknown direction method {options.method!r}; use diff_means, pca or probe")
    for fmt in options.formats:
        if fmt not in ("html", "png", "svg", "pdf"):
            raise ConfigError(f"unknown figure format {fmt!r}; use html, png, svg or pdf")
    options.diagnose_config()  # validates thresholds
    from .judges import load_judge

    load_judge(options.judge)  # validates the judge spec (the model loads on first use)
    prompts = build_prompts(options)
    if set(prompts.harmful_train.texts) == set(prompts.harmless_train.texts):
        raise ConfigError("the harmful and harmless prompts are the same, so no direction can separate them; "
                          "pass different files with --harmful-file and --harmless-file")
    check_layer_options(options)
    return prompts


def check_layer_options(options: RunOptions, *more: list[int] | tuple[int, ...] | None) -> None:
    """Check --layers, --repair-layers, --lora-layers and the lists in `more` against the base model's
    config, so an out-of-range index fails before any weights load (skipped for hub ids, which are
    checked after loading)."""
    from .activations import check_layers
    from .models import layer_count

    layer_lists = [values for values in (options.layers, options.repair_layers, options.lora_layers, *more) if values]
    if not layer_lists:
        return
    n_layers = layer_count(options.base, trust_remote_code=options.trust_remote_code)
    if n_layers is not None:
        for values in layer_lists:
            check_layers(values, n_layers)


def load_run_models(options: RunOptions, *, posts: bool = True) -> tuple[Any, list[Any]]:
    """Load the base model and (optionally) every post-trained model, checking each pair."""
    common = dict(dtype=options.dtype, device=options.device, device_map=options.device_map,
                  trust_remote_code=options.trust_remote_code)
    base = load_model(options.base, name="base", adapter=options.base_adapter, **common)
    loaded = []
    if posts:
        for index, spec in enumerate(options.posts):
            post = load_model(spec, name="post" if index == 0 else f"post{index + 1}",
                              adapter=options.post_adapter, **common)
            check_pair(base, post)
            loaded.append(post)
    return base, loaded


def post_label(spec: str, index: int) -> str:
    """Short label of a post-trained model for figure legends and file names."""
    if index == 0:
        return "post"
    stem = Path(spec.rstrip("/")).name.replace(".gguf", "") or f"post{index + 1}"
    return "".join(character if character.isalnum() or character in "-_." else "_" for character in stem)


def print_diagnosis(diagnosis: Diagnosis, echo=print) -> None:
    """Print the per-layer table, the refusal/capability table and the verdict."""
    metrics = diagnosis.metrics
    echo(f"{'layer':>5} {'sim':>6} {'aurocB':>7} {'aurocP':>7} {'probeB':>7} {'probeP':>7} {'transf':>7} "
         f"{'ampl':>6} {'capAmp':>7} {'mask':>6} {'score':>6}")
    for index, layer in enumerate(metrics.layers):
        echo(f"{layer:>5} {metrics.direction_similarity[index]:>6.3f} {metrics.separability_base[index]:>7.3f} "
             f"{metrics.separability_post[index]:>7.3f} {metrics.probe_accuracy_base[index]:>7.3f} "
             f"{metrics.probe_accuracy_post[index]:>7.3f} {metrics.probe_transfer[index]:>7.3f} "
             f"{metrics.amplification[index]:>6.2f} {metrics.capability_amplification[index]:>7.2f} "
             f"{metrics.masking[index]:>6.3f} {diagnosis.layer_scores[index]:>6.3f}")
    echo("")
    names = list(diagnosis.refusal_rate["base"].keys())
    echo(f"{'model':<6} " + " ".join(f"{'refusal ' + name:>18}" for name in names) + f" {'capability':>11}")
    for model in ("base", "post"):
        accuracy = diagnosis.capability_accuracy[model]
        echo(f"{model:<6} " + " ".join(f"{diagnosis.refusal_rate[model][name]:>18.3f}" for name in names)
             + f" {accuracy if accuracy is not None else float('nan'):>11.3f}")
    echo("")
    echo(f"verdict: {diagnosis.verdict}")
    for reason in diagnosis.verdict_reasons:
        echo(f"  - {reason}")
    echo(f"layer ranking for repair: {diagnosis.layer_ranking[:5]}")


def write_diagnosis(folder: Path, result: DiagnosisResult, name: str = "") -> None:
    """Write diagnosis[-name].json, its tensors and the base/post evaluations into `folder`."""
    suffix = f"-{name}" if name else ""
    write_json(folder / f"diagnosis{suffix}.json", result.diagnosis.to_dict())
    save_tensors(folder / f"directions{suffix}.safetensors", result.tensors())
    save_tensors(folder / f"activations{suffix}.safetensors", result.activation_tensors())
    for model_name, evaluation in result.evaluations.items():
        label = model_name if not name or model_name == "base" else name
        write_json(folder / "evaluations" / f"{label}.json", evaluation.to_dict(with_records=True))


def write_diagnosis_figures(folder: Path, diagnoses: dict[str, Diagnosis], formats) -> None:
    intervals = {name: diagnosis.intervals for name, diagnosis in diagnoses.items() if diagnosis.intervals}
    for name, figure in diagnosis_figures(diagnoses, intervals or None).items():
        save_figure(figure, folder / "figures", name, formats=formats)


def stage_diagnose(options: RunOptions, out: str | Path, *, overwrite: bool = False,
                   progress: ProgressFactory = no_progress, models: tuple[Any, list[Any]] | None = None,
                   echo=None, parallel: bool = True) -> tuple[Path, dict[str, DiagnosisResult]]:
    """Diagnose every post-trained model against the base model and publish a new run folder.

    Inputs are validated first; results are written to a staging folder that replaces `out` only
    when everything succeeded, so a failure leaves no partial output. `parallel` measures the base
    model in a forked process on CPU (see `parallel.side_job`).
    """
    from .judges import load_judge

    out = prepare_new_folder(out, overwrite)
    prompts = check_inputs(options)
    judge = load_judge(options.judge)
    base, posts = models or load_run_models(options)
    staging = staging_folder(out)
    try:
        results: dict[str, DiagnosisResult] = {}
        for index, post in enumerate(posts):
            label = post_label(options.posts[index], index)
            logger.info("diagnosing %s against %s", options.posts[index], options.base)
            reuse = {"base": results["post"].evaluations["base"]} if results else None
            results[label] = diagnose(ModelPair(base, post), prompts, options.diagnose_config(),
                                      evaluations=reuse, judge=judge, progress=progress, parallel=parallel)
        for label, result in results.items():
            write_diagnosis(staging, result, "" if label == "post" else label)
        diagnoses = {label: result.diagnosis for label, result in results.items()}
        if echo is not None:
            for label, diagnosis in diagnoses.items():
                if len(diagnoses) > 1:
                    echo(f"\n== {label}: {diagnosis.post_model}")
                print_diagnosis(diagnosis, echo)
        write_diagnosis_figures(staging, diagnoses, options.formats)
        options.stages["diagnose"] = {"done": True}
        write_json(staging / "config.json", options.to_dict())
        build_report(staging)
        publish_folder(staging, out)
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out, results


def load_options(run_dir: str | Path) -> RunOptions:
    """Read the RunOptions saved in a run folder's config.json."""
    path = Path(run_dir) / "config.json"
    if not Path(run_dir).exists():
        raise RunFolderError(f"run folder {run_dir} not found; check the path, or create it with "
                             f"`safereact run --out {run_dir}`")
    if not path.is_file():
        target = run_dir if not any(Path(run_dir).iterdir()) else "NEW_FOLDER"
        raise RunFolderError(f"{run_dir} is not a run folder (no config.json); pass a folder that `safereact "
                             f"run` or `safereact diagnose` wrote, or create one with `safereact run --out {target}`")
    return RunOptions.from_dict(read_json(path))


def load_diagnosis(run_dir: str | Path) -> Diagnosis:
    """Read the diagnosis of a run folder; raise `RunFolderError` when that stage has not run."""
    path = Path(run_dir) / "diagnosis.json"
    if not path.is_file():
        raise RunFolderError(f"no diagnosis in {run_dir} (diagnosis.json missing); run "
                             f"`safereact diagnose --out {run_dir}` first")
    return Diagnosis.from_dict(read_json(path))


def load_evaluation(run_dir: str | Path, name: str) -> ModelEvaluation | None:
    path = Path(run_dir) / "evaluations" / f"{name}.json"
    return ModelEvaluation.from_dict(read_json(path)) if path.is_file() else None


# ---- patch, repair, verify, run ---------------------------------------------------------------

def _score_config(options: RunOptions):
    from .scoring import RefusalScoreConfig

    settings = {"response_prefix": options.response_prefix, "system_prompt": options.system_prompt}
    if options.refusal_texts:
        settings["refusals"] = tuple(options.refusal_texts)
    if options.compliance_texts:
        settings["compliances"] = tuple(options.compliance_texts)
    return RefusalScoreConfig(**settings)


def _patch_positions(options: RunOptions, tokenizer) -> tuple[int, ...]:
    from .prompts import post_instruction_positions

    if options.patch_positions:
        return tuple(options.patch_positions)
    return post_instruction_positions(tokenizer, options.system_prompt)


def load_directions(run_dir: str | Path, key: str = "safety_base"):
    """Read one set of directions saved by the diagnosis (safety_base, safety_post, capability_*)."""
    from .artifacts import load_tensors
    from .directions import Directions

    path = Path(run_dir) / "directions.safetensors"
    if not path.is_file():
        raise RunFolderError(f"no directions in {run_dir} (directions.safetensors missing); run "
                             f"`safereact diagnose --out {run_dir}` first")
    tensors = load_tensors(path)
    return Directions(layers=tuple(int(layer) for layer in tensors["layers"]), vectors=tensors[key],
                      method="diff_means")


def _refresh_report(run_dir: Path, options: RunOptions, stage: str, info: dict | None = None) -> None:
    options.stages[stage] = {"done": True, **(info or {})}
    write_json(run_dir / "config.json", options.to_dict())
    build_report(run_dir)


def stage_patch(run_dir: str | Path, *, models: tuple[Any, list[Any]] | None = None,
                progress: ProgressFactory = no_progress, options: RunOptions | None = None,
                parallel: bool = True) -> dict:
    """Layer sweep of activation patching and interventions; choose the repair layers; write patching.json.
    `parallel` patches half of the layers in a forked process on CPU."""
    from .activations import check_layers
    from .patching import layer_sweep, select_layers
    from .plots import intervention_figure, patching_figure

    run_dir = Path(run_dir)
    options = options or load_options(run_dir)
    diagnosis = load_diagnosis(run_dir)
    directions = load_directions(run_dir)
    prompts = build_prompts(options)
    if options.repair_layers:
        check_layers(options.repair_layers, len(diagnosis.layers) and max(diagnosis.layers) + 1)
    base, posts = models or load_run_models(options)
    if options.repair_layers:
        check_layers(options.repair_layers, base.n_layers)
    positions = _patch_positions(options, base.tokenizer)
    harmful = prompts.harmful_val.head(min(options.patch_prompts, len(prompts.harmful_val)))
    result = layer_sweep(ModelPair(base, posts[0]), harmful, directions, positions=positions,
                         config=_score_config(options), batch_size=options.batch_size, alphas=options.alphas,
                         progress=progress, parallel=parallel)
    if options.repair_layers:
        selection = {"layers": sorted(check_layers(options.repair_layers, base.n_layers)), "k": len(options.repair_layers),
                     "rule": "given with --layers", "combined_scores": {}}
    else:
        selection = select_layers(result, diagnosis.layer_scores, diagnosis.layers, k=options.k, n_layers=base.n_layers)
    data = result.to_dict()
    data["selection"] = selection
    data["score_separates"] = data["score_base"] > data["score_post"]
    if not data["score_separates"]:
        logger.warning("the refusal score of the base model (%.3f) is not above the post-trained model's (%.3f), "
                       "so fractions restored do not measure refusal; pass --refusal-text and --compliance-text "
                       "with the openings these models actually produce", data["score_base"], data["score_post"])
    write_json(run_dir / "patching.json", data)
    save_figure(patching_figure(data, selection["layers"]), run_dir / "figures", "patching", formats=options.formats)
    save_figure(intervention_figure(data), run_dir / "figures", "interventions", formats=options.formats)
    _refresh_report(run_dir, options, "patch")
    return data


def repair_config(options: RunOptions, layers: list[int]):
    from .repair import RepairConfig

    return RepairConfig(
        layers=tuple(layers), lora_layers=tuple(options.lora_layers) if options.lora_layers else None,
        rank=options.rank, alpha=options.lora_alpha,
        modules=tuple(options.lora_modules) if options.lora_modules else None, steps=options.steps,
        batch_size=options.repair_batch_size, learning_rate=options.learning_rate,
        align_weight=options.align_weight, retain_weight=options.retain_weight, kl_weight=options.kl_weight,
        mode=options.repair_mode, checkpoint_every=options.checkpoint_every, seed=options.seed)


def chosen_layers(run_dir: Path, options: RunOptions) -> list[int]:
    """Return the repair layers: --layers when given, else the selection in patching.json."""
    if options.repair_layers:
        return list(options.repair_layers)
    path = run_dir / "patching.json"
    if not path.is_file():
        raise RunFolderError(f"no patching result in {run_dir} (patching.json missing) to choose the repair "
                             f"layers from; run `safereact patch --run {run_dir}` first, or pass --layers")
    return list(read_json(path)["selection"]["layers"])


def retain_prompts(prompts: EvalPrompts) -> PromptSet:
    """Harmless and capability train prompts, interleaved, for the retain loss."""
    harmless, capability = prompts.harmless_train.prompts, prompts.capability_train.prompts
    mixed = [prompt for pair in zip(harmless, capability) for prompt in pair]
    longer = harmless if len(harmless) > len(capability) else capability
    mixed.extend(longer[min(len(harmless), len(capability)):])
    return PromptSet("harmless", tuple(mixed), "harmless_train+capability_train")


def stage_repair(run_dir: str | Path, *, models: tuple[Any, list[Any]] | None = None, restart: bool = False,
                 on_step=None, options: RunOptions | None = None, stop_after: int | None = None):
    """Train the SafeReAct adapter on the chosen layers; write repair/ (adapter, config, log)."""
    import shutil

    from .activations import check_layers
    from .plots import training_figure
    from .repair import repair

    run_dir = Path(run_dir)
    options = options or load_options(run_dir)
    load_diagnosis(run_dir)
    layers = chosen_layers(run_dir, options)
    config = repair_config(options, layers)
    prompts = build_prompts(options)
    if models is None:
        check_layer_options(options, config.layers, config.adapter_layers)
    base, posts = models or load_run_models(options)
    check_layers(config.layers, base.n_layers)
    check_layers(config.adapter_layers, base.n_layers)
    output = run_dir / "repair"
    if restart and output.exists():
        shutil.rmtree(output)
    directions = load_directions(run_dir) if config.mode == "direction" else None
    load_options_ = dict(dtype=options.dtype, device=options.device, device_map=options.device_map,
                         trust_remote_code=options.trust_remote_code)
    result = repair(base, options.posts[0], prompts.harmful_train, retain_prompts(prompts), config, output=output,
                    post=posts[0] if posts else None, post_adapter=options.post_adapter, base_directions=directions,
                    system_prompt=options.system_prompt, load_options=load_options_, on_step=on_step,
                    stop_after=stop_after)
    if result.log and result.log[-1]["step"] + 1 == config.steps:
        save_figure(training_figure(result.log), run_dir / "figures", "training", formats=options.formats)
        if options.merge:
            export_merged(options.posts[0], output / "adapter", output / "merged",
                          post_adapter=options.post_adapter, load_options=load_options_)
        _refresh_report(run_dir, options, "repair", {"seconds": result.log[-1]["seconds"]})
    return result


def export_merged(post_spec: str, adapter: Path, folder: Path, *, post_adapter: str | None = None,
                  load_options: dict | None = None) -> Path:
    """Write the post-trained model with the repair adapter merged, as a folder `from_pretrained` loads.

    The model is loaded anew and the adapter applied from its saved folder with peft, so the export
    also checks that the saved adapter loads unchanged.
    """
    from .models import apply_adapter, load_unwrapped

    hf_model, tokenizer = load_unwrapped(post_spec, adapter=post_adapter, **(load_options or {}))
    merged = apply_adapter(hf_model, adapter)
    staging = staging_folder(folder)
    try:
        merged.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        publish_folder(staging, folder)
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def activation_addition(run_dir: Path, layers: list[int]):
    """Baseline (i): the addition of the base safety direction that the patching sweep chose (see
    `verify.choose_addition`), else alpha 1 at the last repair layer. Returns (addition, layer, alpha)."""
    from .patching import ActivationAddition
    from .verify import choose_addition

    patching_path = run_dir / "patching.json"
    if patching_path.is_file():
        layer, alpha = choose_addition(read_json(patching_path))
    else:
        layer, alpha = layers[-1], 1.0
    return ActivationAddition(layer, alpha * load_directions(run_dir).at(layer)), layer, alpha


def baselines_job(options: RunOptions, prompts: EvalPrompts, layers: list[int], post, addition,
                  post_evaluation: ModelEvaluation | None, reference_cache: dict | None = None):
    """Build a job for `parallel.side_job` with the baselines' work that does not need the repaired
    model. The job trains and evaluates the refusal-LoRA baseline (with its KL to `post`) and
    generates the capability problems of the activation-addition baseline. It returns a dict with
    `refusal_lora` (the evaluation and its settings for verification.json) and `addition_capability`
    (accuracy, records)."""
    from .judges import load_judge
    from .scoring import evaluate_capability
    from .verify import evaluate_with_kl, train_refusal_lora

    config = repair_config(options, layers)
    load_options_ = dict(dtype=options.dtype, device=options.device, device_map=options.device_map,
                         trust_remote_code=options.trust_remote_code)
    judge = load_judge(options.judge)
    capability = prompts.capability_test

    def job(progress: ProgressFactory) -> dict:
        with progress("refusal-LoRA baseline training", config.steps) as advance:
            model, seconds = train_refusal_lora(options.posts[0], prompts.harmful_train, config,
                                                post_adapter=options.post_adapter, load_options=load_options_,
                                                system_prompt=options.system_prompt,
                                                on_step=lambda step, loss: advance(1))
        evaluation = evaluate_with_kl(model, post, prompts, refusal_sets(prompts), options.generation,
                                      post_evaluation, name="refusal_lora", judge=judge,
                                      kl_prompts=options.kl_prompts, progress=progress,
                                      reference_cache=reference_cache)
        info = {"steps": config.steps, "rank": config.rank, "layers": list(config.adapter_layers),
                "seconds": round(seconds, 1)}
        del model
        with progress("capability problems of activation_addition", len(capability)) as advance:
            addition_capability = evaluate_capability(post, capability, generation=options.generation,
                                                      interventions=[addition], progress=advance)
        return {"refusal_lora": (evaluation, info), "addition_capability": addition_capability}

    return job


def _saved_evaluation(run_dir: Path, name: str, sets: dict) -> ModelEvaluation | None:
    """Return the evaluation of `name` saved in the run folder if it covers the prompt sets `sets`."""
    earlier = load_evaluation(run_dir, name)
    return earlier if earlier is not None and set(earlier.refusal_rate) == set(sets) else None


def stage_verify(run_dir: str | Path, *, models: tuple[Any, list[Any]] | None = None, repaired=None,
                 progress: ProgressFactory = no_progress, options: RunOptions | None = None,
                 parallel: bool = True, baselines: SideJob | FinishedJob | None = None) -> dict:
    """Evaluate base, post-trained, repaired and baseline models and run the causal checks;
    write verification.json and evaluations/<model>.json.

    With `parallel` on CPU, `baselines_job` runs in a forked process while the repaired model is
    evaluated here (see `parallel`). `baselines` is that job when `stage_run` started it earlier.
    """
    from dataclasses import replace

    from .diagnose import evaluate
    from .plots import before_after_figure
    from .verify import (Verification, causal_checks, compare_baselines, evaluate_with_kl, table_row,
                         verification_targets)

    run_dir = Path(run_dir)
    options = options or load_options(run_dir)
    load_diagnosis(run_dir)
    layers = chosen_layers(run_dir, options)
    adapter = run_dir / "repair" / "adapter"
    repair_info_path = run_dir / "repair" / "config.json"
    if repaired is None and not (adapter / "adapter_config.json").is_file():
        raise RunFolderError(f"no repair adapter in {adapter}; run `safereact repair --run {run_dir}` first")
    repair_info = read_json(repair_info_path)
    prompts = build_prompts(options)
    base, posts = models or load_run_models(options)
    post = posts[0]
    load_options_ = dict(dtype=options.dtype, device=options.device, device_map=options.device_map,
                         trust_remote_code=options.trust_remote_code)
    if repaired is None:
        from .models import apply_adapter, load_unwrapped, wrap_model

        hf_model, tokenizer = load_unwrapped(options.posts[0], adapter=options.post_adapter, **load_options_)
        repaired = wrap_model(apply_adapter(hf_model, adapter), tokenizer, name="repaired", spec=options.posts[0])

    from .judges import load_judge

    judge = load_judge(options.judge)
    sets = refusal_sets(prompts)
    generation = options.generation
    evaluations: dict[str, ModelEvaluation] = {}
    for name, model in (("post", post), ("base", base)):
        evaluations[name] = (_saved_evaluation(run_dir, name, sets)
                             or evaluate(model, prompts, generation, judge=judge, progress=progress,
                                         parallel=parallel))
    post_evaluation = evaluations["post"]
    evaluations["post"] = ModelEvaluation(**{**post_evaluation.__dict__, "kl_to_post": 0.0})
    from .scoring import kl_divergence

    baselines_info: dict = {}
    post_distributions: dict = {}  # the post-trained model's next-token distributions, for every KL
    with ExitStack() as stack:
        if options.baselines:
            addition, layer, alpha = activation_addition(run_dir, layers)
            baselines_info["activation_addition"] = {"layer": layer, "alpha": alpha}
            if baselines is None:
                job = baselines_job(options, prompts, layers, post, addition, post_evaluation, post_distributions)
                baselines = stack.enter_context(side_job(job, "baselines", progress=progress, enabled=parallel))
        watched = baselines.watch(progress) if baselines is not None else progress

        harmless = prompts.harmless_test.head(min(options.kl_prompts, len(prompts.harmless_test)))
        by_id = {record["id"]: record["response"] for record in post_evaluation.records.get("harmless", [])}
        responses = ([by_id[prompt.id] for prompt in harmless] if all(prompt.id in by_id for prompt in harmless)
                     else None)
        evaluations["base"] = ModelEvaluation(**{**evaluations["base"].__dict__, "kl_to_post": kl_divergence(
            base, post, harmless, responses, system_prompt=options.system_prompt,
            reference_cache=post_distributions)})
        evaluations["repaired"] = evaluate_with_kl(repaired, post, prompts, sets, generation, post_evaluation,
                                                   name="repaired", judge=judge, kl_prompts=options.kl_prompts,
                                                   progress=watched, reference_cache=post_distributions,
                                                   parallel=parallel)

        if options.baselines:
            # The capability problems of this baseline are generated in the baselines job.
            without_capability = evaluate_with_kl(post, post, prompts, sets, generation, post_evaluation,
                                                  name="activation_addition", interventions=[addition],
                                                  judge=judge, kl_prompts=options.kl_prompts, progress=watched,
                                                  reference_cache=post_distributions, parallel=parallel,
                                                  capability=False)
            baseline_results = baselines.result()
            accuracy, records = baseline_results["addition_capability"]
            evaluations["activation_addition"] = replace(without_capability, capability_accuracy=accuracy,
                                                         records={**without_capability.records,
                                                                  "capability": records})
            evaluations["refusal_lora"], baselines_info["refusal_lora"] = baseline_results["refusal_lora"]

    positions = tuple(repair_info.get("positions") or _patch_positions(options, base.tokenizer))
    harmful = prompts.harmful_val.head(min(options.patch_prompts, len(prompts.harmful_val)))
    checks = causal_checks(post, repaired, harmful, layers, positions, load_directions(run_dir),
                           config=_score_config(options), batch_size=options.batch_size)

    advbench = next((name for name in prompts.harmful_extra if "advbench" in name), None)
    order = ["base", "post", "repaired", "activation_addition", "refusal_lora"]
    table = {name: table_row(evaluations[name], advbench) for name in order if name in evaluations}
    log = [entry for entry in _read_log(run_dir)]
    trainable = repair_info["trainable_parameters"] / max(repair_info["total_parameters"], 1)
    verification = Verification(
        models=table, fraction_restored_by_patching=checks["fraction_restored_by_patching"],
        ablation_refusal_drop=checks["ablation_refusal_drop"], trainable_parameter_fraction=trainable,
        repair_seconds=log[-1]["seconds"] if log else float("nan"), layers=list(layers),
        refusal_scores={key: value for key, value in checks.items() if key.startswith("score_")},
        per_layer_fraction_restored=checks["per_layer_fraction_restored"],
        baselines={**baselines_info, **compare_baselines(table)},
        n_prompts={name: len(prompt_set) for name, prompt_set in sets.items()} | {
            "capability": len(prompts.capability_test), "causal_checks": len(harmful), "kl": len(harmless)},
        targets=verification_targets(table, table["post"]["capability_accuracy"]),
        intervals=verification_intervals(evaluations, advbench, options))
    data = verification.to_dict()
    for name in ("repaired", "activation_addition", "refusal_lora"):
        if name in evaluations:
            write_json(run_dir / "evaluations" / f"{name}.json", evaluations[name].to_dict(with_records=True))
    write_json(run_dir / "verification.json", data)
    save_figure(before_after_figure(data, data.get("intervals") or None), run_dir / "figures", "before_after", formats=options.formats)
    _refresh_report(run_dir, options, "verify")
    return data


def verification_intervals(evaluations: dict[str, ModelEvaluation], advbench: str | None,
                           options: RunOptions) -> dict:
    """Bootstrap [low, high] intervals of each model's rates and accuracy, from per-prompt records."""
    from .uncertainty import BootstrapConfig, rate_interval

    if options.bootstrap <= 0:
        return {}
    config = BootstrapConfig(n_resamples=options.bootstrap, seed=options.seed)
    keys = {"harmful_refusal_rate": ("harmful", "refused"), "harmless_refusal_rate": ("harmless", "refused"),
            "capability_accuracy": ("capability", "correct")}
    if advbench:
        keys["harmful_refusal_rate_advbench"] = (advbench, "refused")
    intervals = {}
    for name, evaluation in evaluations.items():
        intervals[name] = {metric: list(rate_interval([record[field] for record in evaluation.records[records]], config))
                           for metric, (records, field) in keys.items() if evaluation.records.get(records)}
    return intervals


def _read_log(run_dir: Path) -> list[dict]:
    import json

    path = run_dir / "repair" / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def print_verification(data: dict, echo=print) -> None:
    """Print the verification table and the causal checks."""
    from .verify import BASELINE_LABELS

    echo(f"{'model':<20} {'harmful':>8} {'advbench':>9} {'harmless':>9} {'capability':>11} {'KL to post':>11}")
    for name, row in data["models"].items():
        cells = [row.get(key) for key in ("harmful_refusal_rate", "harmful_refusal_rate_advbench",
                                          "harmless_refusal_rate", "capability_accuracy", "kl_to_post")]
        echo(f"{name:<20} " + " ".join(f"{'n/a' if value is None else f'{value:.3f}':>{width}}"
                                       for value, width in zip(cells, (8, 9, 9, 11, 11))))
    echo("")
    echo(f"repair layers {data['layers']}: patching their activations into the post-trained model restores "
         f"{data['fraction_restored_by_patching']:.2f} of the regained refusal score; ablating the base "
         f"safety direction removes {data['ablation_refusal_drop']:.2f} times the regained score")
    echo(f"trainable parameters: {100 * data['trainable_parameter_fraction']:.2f} %, repair time "
         f"{data['repair_seconds']:.0f} s")
    for key, value in data.get("targets", {}).items():
        echo(f"  target {key}: {'met' if value else 'NOT met'}")
    for key, value in data.get("baselines", {}).items():
        if isinstance(value, bool):
            echo(f"  {BASELINE_LABELS.get(key, key.replace('_', ' '))}: {'yes' if value else 'no'}")


def stage_run(options: RunOptions, out: str | Path, *, overwrite: bool = False, resume: bool = False,
              progress: ProgressFactory = no_progress, on_step=None, echo=None, parallel: bool = True) -> Path:
    """Run all stages (diagnose into a new folder, patch, repair, verify), loading the models once.

    With `resume`, an existing run folder keeps the stages it completed (same config) and the repair
    continues from its checkpoint. With `parallel` on CPU, independent work runs in a forked process:
    the base model's measurements, half of the patched layers, the baselines during the repair, and
    the capability problems of each evaluation. See the `parallel` module on float rounding.
    """
    out = Path(out)
    if resume and (out / "config.json").is_file():
        saved = load_options(out)
        saved_settings = {key: value for key, value in saved.to_dict().items() if key != "stages"}
        new_settings = {key: value for key, value in options.to_dict().items() if key != "stages"}
        if saved_settings != new_settings:
            raise RunFolderError(f"{out} was started with other settings; rerun with the same options, or "
                                 "pass --overwrite to start over")
        options = saved
    else:
        prepare_new_folder(out, overwrite)
    check_inputs(options)
    models = load_run_models(options)
    if not options.stages.get("diagnose", {}).get("done"):
        stage_diagnose(options, out, overwrite=True, progress=progress, models=models, echo=echo,
                       parallel=parallel)
        options = load_options(out)
    elif echo is not None:
        print_diagnosis(load_diagnosis(out), echo)
    if not options.stages.get("patch", {}).get("done"):
        stage_patch(out, models=models, progress=progress, options=options, parallel=parallel)
    # The baselines need only the chosen layers, so on CPU the refusal-LoRA baseline trains in a
    # forked process while the repair trains here.
    prompts = build_prompts(options)
    post_evaluation = _saved_evaluation(out, "post", refusal_sets(prompts))
    result = None
    with ExitStack() as stack:
        baselines = None
        if parallel and can_fork() and options.baselines and post_evaluation is not None:
            layers = chosen_layers(out, options)
            addition, _, _ = activation_addition(out, layers)
            job = baselines_job(options, prompts, layers, models[1][0], addition, post_evaluation)
            baselines = stack.enter_context(side_job(job, "baselines", progress=progress))
        if not options.stages.get("repair", {}).get("done"):
            repair_step = baselines.polling(on_step) if baselines is not None else on_step
            result = stage_repair(out, models=models, on_step=repair_step, options=options)
        data = stage_verify(out, models=models, repaired=result.model if result else None, progress=progress,
                            options=options, parallel=parallel, baselines=baselines)
    if echo is not None:
        echo("")
        print_verification(data, echo)
    return out


def stage_attribute(run_dir: str | Path, *, models: tuple[Any, list[Any]] | None = None, n_prompts: int = 64,
                    heads: bool = True, options: RunOptions | None = None) -> dict:
    """Component attribution of the safety signal and the norm growth; write attribution.json and figures."""
    from .attribution import component_attribution
    from .plots import attribution_figure, head_attribution_figure

    run_dir = Path(run_dir)
    options = options or load_options(run_dir)
    diagnosis = load_diagnosis(run_dir)
    directions = load_directions(run_dir)
    prompts = build_prompts(options)
    base, posts = models or load_run_models(options)
    harmful = prompts.harmful_train.head(min(n_prompts, len(prompts.harmful_train)))
    harmless = prompts.harmless_train.head(min(n_prompts, len(prompts.harmless_train)))
    result = component_attribution(ModelPair(base, posts[0]), harmful, harmless, directions,
                                   layers=diagnosis.layers, positions=tuple(diagnosis.positions), heads=heads,
                                   batch_size=options.batch_size)
    data = result.to_dict()
    data["top_heads"] = result.top_heads()
    write_json(run_dir / "attribution.json", data)
    save_figure(attribution_figure(data), run_dir / "figures", "attribution", formats=options.formats)
    if data["heads"]:
        save_figure(head_attribution_figure(data), run_dir / "figures", "attribution_heads", formats=options.formats)
    _refresh_report(run_dir, options, "attribute")
    return data
