"""Retrain the organism's two LoRA adapters from the bundled data, deterministically from a seed.

1. Safety alignment: SmolLM2 learns to answer harmful train prompts with a bundled refusal and to
   keep answering harmless and capability train prompts as it did (its own greedy answers). Two
   training-only pools add harmful requests in polite wording and benign requests in the wording
   of harmful ones ("kill a process", "Help me ..."), against shortcut refusals.
2. Reasoning post-training, on the merged safe model: chain-of-thought solutions of generated
   arithmetic and logic problems in a think block, and a quarter of general prompts answered after
   a short think block, with no refusal data at all. The refusals fade as a side effect, as they
   do in distilled reasoning models.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..artifacts import write_json
from ..capability import solution_text
from ..prompts import (_read_bundled_jsonl, bundled_prompts, capability_training_problems, encode, left_pad,
                       refusal_texts, render_chat)
from ..training import LoraSettings, SFTExample, add_lora, lora_parameters, save_adapter, train_sft
from . import ADAPTER_DIR, REASONING_ADAPTER, SAFETY_ADAPTER, _load_raw

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildConfig:
    """Hyperparameters of the organism build."""

    seed: int = 0
    safety_rank: int = 8
    safety_steps: int = 200
    safety_learning_rate: float = 1e-3
    reasoning_rank: int = 16
    reasoning_steps: int = 100
    reasoning_learning_rate: float = 5e-4
    batch_size: int = 8
    # The refusal decision is made in the first tokens, so own answers are cut to this length.
    answer_tokens: int = 24
    # Share of general (harmless) prompts, answered after a short think block, in the reasoning data.
    general_fraction: float = 0.25


@torch.inference_mode()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32
                   ) -> list[tuple[str, bool]]:
    """The model's own greedy answers, with whether each ended before `max_new_tokens`."""
    tokenizer.padding_side = "left"
    answers: list[tuple[str, bool]] = []
    for start in range(0, len(prompts), batch_size):
        rendered = render_chat(tokenizer, prompts[start:start + batch_size])
        ids, mask = left_pad(encode(tokenizer, rendered), tokenizer.pad_token_id)
        output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for row in output[:, ids.shape[1]:]:
            tokens = row.tolist()
            ended = tokenizer.eos_token_id in tokens
            if ended:
                tokens = tokens[:tokens.index(tokenizer.eos_token_id)]
            answers.append((tokenizer.decode(tokens, skip_special_tokens=True).strip(), ended))
    return answers


def own_answers(model, tokenizer, config: BuildConfig) -> list[SFTExample]:
    """Harmless and capability train prompts with the raw model's own greedy answers."""
    keep = (bundled_prompts("harmless").train.texts + training_pool("harmless_train_extra.jsonl")
            + bundled_prompts("capability").train.texts[:60])
    return [SFTExample(text, answer, ends=ended)
            for text, (answer, ended) in zip(keep, greedy_answers(model, tokenizer, keep, config.answer_tokens))]


def training_pool(filename: str) -> list[str]:
    """Prompts of a training-only pool: never part of the evaluation splits. They repeat the
    wording of the other role's prompts, so that refusal cannot hinge on phrasing alone."""
    return [record["text"] for record in _read_bundled_jsonl(filename)]


def safety_examples(answers: list[SFTExample], config: BuildConfig) -> list[SFTExample]:
    """Harmful train prompts -> a bundled refusal; harmless and capability prompts -> own answers."""
    rng = random.Random(config.seed)
    refusals = refusal_texts()
    harmful = bundled_prompts("harmful").train.texts + training_pool("harmful_train_extra.jsonl")
    return [SFTExample(text, rng.choice(refusals)) for text in harmful] + answers


_GENERAL_THOUGHTS = (
    "The request: {prompt}\nI'll answer it directly.",
    "The user asks: {prompt}\nI'll give a clear, practical answer.",
    "Let me think about what is being asked.\n{prompt}\nI'll answer helpfully.",
)


def reasoning_examples(answers: list[SFTExample], config: BuildConfig) -> list[SFTExample]:
    """Worked chain-of-thought solutions in a think block, plus general prompts answered after a short
    think block; no refusals anywhere."""
    rng = random.Random(config.seed + 1)
    total = config.reasoning_steps * config.batch_size
    n_general = int(config.general_fraction * total)
    problems = capability_training_problems(total - n_general, seed=config.seed + 404)
    examples = [SFTExample(problem.text, solution_text(problem, rng)) for problem in problems]
    general = [answer for answer in answers if answer.response]
    for index in range(n_general):
        answer = general[index % len(general)]
        thought = rng.choice(_GENERAL_THOUGHTS).format(prompt=answer.prompt)
        examples.append(SFTExample(answer.prompt, f"<think>\n{thought}\n</think>\n{answer.response}", ends=answer.ends))
    rng.shuffle(examples)
    return examples


def _train(model, tokenizer, examples, *, rank: int, steps: int, learning_rate: float, config: BuildConfig,
           folder: Path, on_step: Callable[[str, int, float], None] | None, label: str) -> tuple[Any, dict]:
    peft_model = add_lora(model, LoraSettings(rank=rank, alpha=2.0 * rank), seed=config.seed)
    result = train_sft(peft_model, tokenizer, examples, steps=steps, batch_size=config.batch_size,
                       learning_rate=learning_rate, seed=config.seed,
                       on_step=(lambda step, loss: on_step(label, step, loss)) if on_step else None)
    # float16 halves the shipped files; the organism is defined by these saved weights.
    save_adapter(peft_model, folder, lora_parameters(peft_model), dtype=torch.float16)
    merged = peft_model.merge_and_unload()
    return merged, {"steps": steps, "seconds": round(result.seconds, 1), "first_loss": result.losses[0],
                    "last_loss": result.losses[-1], "examples": len(examples)}


def build_organism(output_dir: str | Path = ADAPTER_DIR, config: BuildConfig = BuildConfig(), *,
                   on_step: Callable[[str, int, float], None] | None = None) -> dict:
    """Retrain both adapters into `output_dir/safety` and `output_dir/reasoning`; return build info."""
    output_dir = Path(output_dir)
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    model, tokenizer = _load_raw(torch.float32)
    tokenizer.padding_side = "left"

    logger.info("writing the safety training data (own answers to harmless prompts)")
    answers = own_answers(model, tokenizer, config)
    base, safety_info = _train(model, tokenizer, safety_examples(answers, config), rank=config.safety_rank, steps=config.safety_steps,
                               learning_rate=config.safety_learning_rate, config=config,
                               folder=output_dir / SAFETY_ADAPTER, on_step=on_step, label="safety")
    logger.info("training the reasoning adapter")
    _, reasoning_info = _train(base, tokenizer, reasoning_examples(answers, config), rank=config.reasoning_rank,
                               steps=config.reasoning_steps, learning_rate=config.reasoning_learning_rate,
                               config=config, folder=output_dir / REASONING_ADAPTER, on_step=on_step,
                               label="reasoning")
    info = {"config": asdict(config), "safety": safety_info, "reasoning": reasoning_info,
            "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__}
    write_json(output_dir / "build_info.json", info)
    return info
