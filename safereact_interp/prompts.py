"""Prompt sets with fixed splits, loaders for public prompt files, and chat rendering.

The toolkit works with three roles of prompts: harmful (H), harmless (N, also the over-refusal
check) and capability (C, problems of the post-trained ability with checkable answers). Bundled
sets, written for this project, have fixed train / val / test splits, so every run and every
number in a report refers to the same prompts. Public files (AdvBench, HarmBench, JailbreakBench,
StrongREJECT-style CSV, Alpaca-style JSON, JSONL, plain text) load by path.

Prompts are rendered with each model's chat template. The *readout positions* are given as
negative offsets from the end of the rendered prompt (-1 is the last prompt token), because such
offsets stay valid under left padding. The post-instruction positions are the template tokens that
follow the user's text.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from .capability import Problem, generate_problems
from .errors import ConfigError, PromptFileError

logger = logging.getLogger(__name__)

Role = Literal["harmful", "harmless", "capability"]
ROLES: tuple[Role, ...] = ("harmful", "harmless", "capability")
SPLITS = ("train", "val", "test")

# Columns tried, in order, when a CSV file does not name its prompt column.
CSV_PROMPT_COLUMNS = ("goal", "Goal", "Behavior", "behavior", "prompt", "Prompt", "forbidden_prompt",
                      "instruction", "text")
JSON_PROMPT_KEYS = ("instruction", "prompt", "goal", "Behavior", "forbidden_prompt", "text")
CATEGORY_COLUMNS = ("category", "Category", "SemanticCategory", "semantic_category")

# Fixed split sizes per bundled category (30 prompts): train 15, val 5, test 10.
_TRAIN_PER_CATEGORY, _VAL_PER_CATEGORY = 15, 5
_SPLIT_SEED = 20240611
# Capability splits: test and val come first so that training problems can exclude them.
_CAPABILITY_SIZES = {"test": 100, "val": 60, "train": 400}
_CAPABILITY_SEEDS = {"test": 101, "val": 202, "train": 303}


@dataclass(frozen=True)
class Prompt:
    """One prompt: its text, an id, and for capability prompts the problem with its answer."""

    text: str
    id: str
    category: str | None = None
    problem: Problem | None = None


@dataclass(frozen=True)
class PromptSet:
    """An ordered set of prompts of one role, with where they came from."""

    role: Role
    prompts: tuple[Prompt, ...]
    source: str

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    @property
    def texts(self) -> list[str]:
        return [prompt.text for prompt in self.prompts]

    def head(self, n: int | None) -> PromptSet:
        """Return the first `n` prompts (all of them when `n` is None)."""
        if n is None:
            return self
        if n < 1:
            raise ConfigError(f"prompt count must be at least 1, got {n}")
        return replace(self, prompts=self.prompts[:n], source=f"{self.source}[:{n}]")

    def sample(self, n: int, seed: int = 0) -> PromptSet:
        """Return `n` prompts drawn without replacement (all of them when `n` >= len)."""
        if n >= len(self.prompts):
            return self
        rng = random.Random(seed)
        chosen = sorted(rng.sample(range(len(self.prompts)), n))
        return replace(self, prompts=tuple(self.prompts[index] for index in chosen),
                       source=f"{self.source}[sample {n}, seed {seed}]")

    def to_dict(self) -> dict:
        return {"role": self.role, "source": self.source, "n": len(self.prompts),
                "ids": [prompt.id for prompt in self.prompts]}


@dataclass(frozen=True)
class PromptSplits:
    """Train, validation and test sets of one role."""

    train: PromptSet
    val: PromptSet
    test: PromptSet

    def __getitem__(self, split: str) -> PromptSet:
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return getattr(self, split)


def _read_bundled_jsonl(filename: str) -> list[dict]:
    text = resources.files("safereact_interp").joinpath("data", filename).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _stratified_splits(records: list[dict], role: Role, source: str) -> PromptSplits:
    """Split per category with a fixed seed: 15 train, 5 val, the rest test."""
    by_category: dict[str, list[dict]] = {}
    for record in records:
        by_category.setdefault(record["category"], []).append(record)
    rng = random.Random(_SPLIT_SEED)
    parts: dict[str, list[Prompt]] = {split: [] for split in SPLITS}
    for category in sorted(by_category):
        items = sorted(by_category[category], key=lambda record: record["id"])
        rng.shuffle(items)
        bounds = {"train": items[:_TRAIN_PER_CATEGORY],
                  "val": items[_TRAIN_PER_CATEGORY:_TRAIN_PER_CATEGORY + _VAL_PER_CATEGORY],
                  "test": items[_TRAIN_PER_CATEGORY + _VAL_PER_CATEGORY:]}
        for split, chosen in bounds.items():
            parts[split].extend(Prompt(text=record["text"], id=record["id"], category=category)
                                for record in chosen)
    return PromptSplits(**{split: PromptSet(role, tuple(sorted(parts[split], key=lambda p: p.id)),
                                            f"{source}:{split}") for split in SPLITS})


@lru_cache(maxsize=None)
def bundled_prompts(role: Role) -> PromptSplits:
    """Return the bundled prompt set of `role` with its fixed train / val / test splits.

    harmful: 360 requests over 12 harm categories; harmless: 360 benign requests over 12 topics
    (48 of them worded to look edgy); capability: generated multi-step arithmetic and logic
    problems (400 train, 60 val, 100 test).
    """
    if role == "harmful":
        return _stratified_splits(_read_bundled_jsonl("harmful.jsonl"), role, "bundled:harmful")
    if role == "harmless":
        return _stratified_splits(_read_bundled_jsonl("harmless.jsonl"), role, "bundled:harmless")
    if role == "capability":
        return _capability_splits()
    raise ConfigError(f"unknown prompt role {role!r}; use one of {', '.join(ROLES)}")


def _capability_splits() -> PromptSplits:
    taken: set[str] = set()
    sets = {}
    for split in ("test", "val", "train"):
        problems = generate_problems(_CAPABILITY_SIZES[split], _CAPABILITY_SEEDS[split], exclude=taken)
        taken.update(problem.text for problem in problems)
        prompts = tuple(Prompt(text=problem.text, id=f"cap-{split}-{index:03d}", category=problem.kind,
                               problem=problem) for index, problem in enumerate(problems))
        sets[split] = PromptSet("capability", prompts, f"bundled:capability:{split}")
    return PromptSplits(**sets)


def capability_training_problems(n: int, seed: int = 404) -> list[Problem]:
    """Problems for training (the organism's reasoning data), disjoint from the val and test splits."""
    splits = bundled_prompts("capability")
    held_out = {prompt.text for prompt in splits.val} | {prompt.text for prompt in splits.test}
    return generate_problems(n, seed, exclude=held_out)


def refusal_texts() -> list[str]:
    """Return the bundled refusal replies (organism training and the refusal-LoRA baseline)."""
    text = resources.files("safereact_interp").joinpath("data", "refusals.json").read_text(encoding="utf-8")
    return list(json.loads(text))


# ---- loaders for prompt files ---------------------------------------------------------------

def _clean(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _prompts_from_records(records: list[dict], path: Path, key: str | None, keys: Sequence[str]) -> list[Prompt]:
    if not records:
        raise PromptFileError(f"prompt file {path} has no records; it must contain at least one prompt")
    available = list(records[0].keys())
    chosen = key
    if chosen is None:
        chosen = next((candidate for candidate in keys if candidate in available), None)
    if chosen is None or chosen not in available:
        columns = ", ".join(map(str, available))
        if key:
            raise PromptFileError(f"prompt file {path} has no column {key!r} (its columns: {columns}); pass one "
                                  "of its columns with --column (column= in Python)")
        known = ", ".join(dict.fromkeys(candidate.lower() for candidate in keys))
        raise PromptFileError(
            f"prompt file {path} has none of the known prompt columns ({known}, in any case; its columns: "
            f"{columns}); name the prompt column with --column (column= in Python)")
    category_key = next((candidate for candidate in CATEGORY_COLUMNS if candidate in available), None)
    prompts = []
    for index, record in enumerate(records):
        text = _clean(record.get(chosen))
        context = _clean(record.get("ContextString"))
        extra_input = _clean(record.get("input"))
        if not text:
            continue
        if context:
            text = f"{context}\n\n---\n\n{text}"
        if extra_input:
            text = f"{text}\n\n{extra_input}"
        category = _clean(record.get(category_key)) or None if category_key else None
        prompts.append(Prompt(text=text, id=f"{path.stem}-{index:04d}", category=category))
    return prompts


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8-sig") as file:
        # strict: an unterminated quote raises instead of swallowing the rest of the file into one prompt
        reader = csv.DictReader(file, strict=True)
        if reader.fieldnames is None:
            raise PromptFileError(f"prompt file {path} is empty; it needs a header row and prompts")
        return list(reader)


def _read_json(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PromptFileError(f"prompt file {path} is not valid JSON: {error}; fix it there, or save the "
                              "prompts as JSONL (one JSON value per line), CSV or plain text") from error
    found = "an object without a list value" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
    if isinstance(data, dict):
        data = next((value for value in data.values() if isinstance(value, list)), None)
    if not isinstance(data, list):
        raise PromptFileError(f"prompt file {path} contains {found}; it must contain a JSON list of strings, or "
                              f"of objects with one of the keys {', '.join(JSON_PROMPT_KEYS)}")
    return data


def _read_jsonl(path: Path) -> list[Any]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise PromptFileError(f"prompt file {path}, line {number}, is not valid JSON ({error.msg} at column "
                                  f"{error.colno}); each line must be one JSON string or object") from error
    return records


def load_prompt_file(
    path: str | Path,
    role: Role = "harmful",
    *,
    column: str | None = None,
    limit: int | None = None,
) -> PromptSet:
    """Load prompts from a CSV, JSON, JSONL or plain-text file.

    CSV: the column `column`, else the first of goal / Goal / Behavior / prompt / forbidden_prompt /
    instruction / text (AdvBench, JailbreakBench, HarmBench, StrongREJECT). A HarmBench
    `ContextString` is put before its behavior. JSON and JSONL: a list of strings or objects with
    instruction / prompt / text (Alpaca's `input` is appended). Text: one prompt per non-empty line.
    `limit` keeps the first `limit` prompts.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} not found; check the path")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            prompts = _prompts_from_records(_read_csv(path), path, column, CSV_PROMPT_COLUMNS)
        elif suffix in (".json", ".jsonl"):
            data = _read_json(path) if suffix == ".json" else _read_jsonl(path)
            if data and all(isinstance(item, str) for item in data):
                prompts = [Prompt(text=item.strip(), id=f"{path.stem}-{index:04d}")
                           for index, item in enumerate(data) if item.strip()]
            elif data and all(isinstance(item, dict) for item in data):
                prompts = _prompts_from_records(data, path, column, JSON_PROMPT_KEYS)
            elif not data:
                prompts = []
            else:
                raise PromptFileError(
                    f"prompt file {path} mixes strings and objects; use a list of one kind")
        elif suffix in (".txt", ".text", ""):
            lines = path.read_text(encoding="utf-8").splitlines()
            prompts = [Prompt(text=line.strip(), id=f"{path.stem}-{index:04d}")
                       for index, line in enumerate(lines) if line.strip()]
        else:
            raise PromptFileError(
                f"prompt file {path} has an unknown extension {suffix!r}; use .csv, .json, .jsonl or .txt")
    except UnicodeDecodeError as error:
        raise PromptFileError(f"prompt file {path} is not UTF-8 text: {error}") from error
    except csv.Error as error:
        raise PromptFileError(f"prompt file {path} is not valid CSV: {error}; check for an unclosed quote") from error

    if not prompts:
        hint = {".csv": "add rows with text in the prompt column below the header",
                ".json": "put at least one prompt in its list",
                ".jsonl": "add one JSON string or object per line"}.get(suffix, "write one prompt per line")
        raise PromptFileError(f"prompt file {path} contains no prompts; {hint}")
    prompt_set = PromptSet(role, tuple(prompts), str(path))
    return prompt_set.head(limit) if limit is not None else prompt_set


# Named formats of public prompt files: the prompt column or key, and where the category is.
NAMED_FORMATS = {
    "advbench": {"column": "goal"},
    "harmbench": {"column": "Behavior"},
    "jailbreakbench": {"column": "Goal"},
    "strongreject": {"column": "forbidden_prompt"},
    "alpaca": {"column": "instruction"},
}
FORMATS = ("auto",) + tuple(NAMED_FORMATS)


def load_named(path: str | Path, format: str = "auto", role: Role = "harmful", *, column: str | None = None,
               limit: int | None = None, include_copyright: bool = False) -> PromptSet:
    """Load a public prompt file by format name: advbench (goal), harmbench (Behavior, with its
    context string; copyright behaviours dropped unless `include_copyright`), jailbreakbench (Goal),
    strongreject (forbidden_prompt), alpaca (instruction + input), or auto (column detection).
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown prompt file format {format!r}; use one of {', '.join(FORMATS)}")
    if format == "auto":
        prompts = load_prompt_file(path, role, column=column)
    else:
        prompts = load_prompt_file(path, role, column=column or NAMED_FORMATS[format]["column"])
    if format == "harmbench" and not include_copyright:
        kept = tuple(prompt for prompt in prompts if prompt.category != "copyright")
        prompts = replace(prompts, prompts=kept)
        if not kept:
            raise PromptFileError(f"prompt file {path} contains only copyright behaviours; pass include_copyright=True")
    return prompts.head(limit) if limit is not None else prompts


# ---- chat rendering and tokenization ---------------------------------------------------------

_FALLBACK_TEMPLATE = "User: {text}\nAssistant:"
_SENTINEL = "\u2063SAFEREACT_SENTINEL\u2063"


def has_chat_template(tokenizer: Any) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def render_chat(tokenizer: Any, texts: Sequence[str], *, system_prompt: str | None = None,
                response_prefix: str = "") -> list[str]:
    """Render user messages with the tokenizer's chat template, ready for the assistant's reply.

    Tokenizers without a chat template get "User: ...\\nAssistant:" and a warning.
    `response_prefix` is appended after the assistant header (for example "<think>\\n").
    """
    if not has_chat_template(tokenizer):
        logger.warning("tokenizer has no chat template; using the plain format %r", _FALLBACK_TEMPLATE)
        return [_FALLBACK_TEMPLATE.format(text=text) + response_prefix for text in texts]
    rendered = []
    for text in texts:
        messages = [{"role": "user", "content": text}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                        + response_prefix)
    return rendered


def post_instruction_length(tokenizer: Any, system_prompt: str | None = None) -> int:
    """Count the template tokens after the user's text (end of turn plus assistant header)."""
    rendered = render_chat(tokenizer, [_SENTINEL], system_prompt=system_prompt)[0]
    suffix = rendered.split(_SENTINEL, 1)[1]
    return max(1, len(tokenizer(suffix, add_special_tokens=False).input_ids))


def post_instruction_positions(tokenizer: Any, system_prompt: str | None = None) -> tuple[int, ...]:
    """Readout positions covering every post-instruction token, as negative offsets."""
    count = post_instruction_length(tokenizer, system_prompt)
    return tuple(range(-count, 0))


def encode(tokenizer: Any, rendered: Sequence[str]) -> list[list[int]]:
    """Tokenize rendered prompts without adding special tokens, because the chat template contains them."""
    add_special = not has_chat_template(tokenizer)
    return [tokenizer(text, add_special_tokens=add_special).input_ids for text in rendered]


def shared_prefix_length(sequences: Sequence[Sequence[int]], keep: int = 1) -> int:
    """Return the length of the token prefix that every sequence starts with, leaving at least `keep`
    tokens of the shortest one after it.

    Every rendered prompt starts with the chat template's system block and user header, so their keys
    and values need computing only once per batch.
    """
    if not sequences:
        return 0
    first, limit = sequences[0], min(len(sequence) for sequence in sequences) - keep
    length = 0
    while length < limit and all(sequence[length] == first[length] for sequence in sequences):
        length += 1
    return max(length, 0)


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Left-pad token id lists into (input_ids, attention_mask), so that every prompt ends at the
    last column and negative readout offsets index the same tokens in every row."""
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            ids[row, width - len(sequence):] = torch.tensor(list(sequence), dtype=torch.long)
            mask[row, width - len(sequence):] = 1
    return ids, mask


def split_shared_prefix(sequences: Sequence[Sequence[int]], shared: int, pad_id: int
                        ) -> tuple[Int[Tensor, "1 prefix"], Int[Tensor, "batch rest"], Int[Tensor, "batch pos"],
                                   Int[Tensor, "batch rest"]]:
    """Split sequences that share their first `shared` tokens into that prefix (one row) and the
    rest of each sequence, left-padded.

    Returns the prefix ids, the rest's ids, the attention mask over prefix and rest, and the rest's
    position ids. The padding sits between prefix and rest, where the mask hides it. Position ids
    count only real tokens, so a row computes what it would alone.
    """
    prefix = torch.tensor([list(sequences[0][:shared])], dtype=torch.long)
    ids, rest_mask = left_pad([sequence[shared:] for sequence in sequences], pad_id)
    mask = torch.cat([torch.ones(len(sequences), shared, dtype=rest_mask.dtype), rest_mask], dim=1)
    positions = (rest_mask.cumsum(-1) - 1 + shared).clamp_min(0)
    return prefix, ids, mask, positions


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Group indices into batches of similar length (less padding), longest first."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


@dataclass(frozen=True)
class EvalPrompts:
    """The prompt sets of one diagnosis or evaluation.

    Directions come from the train sets, separability and probe transfer are scored on the
    validation sets, and refusal rates and capability accuracy on the test sets. `harmful_extra`
    contains further harmful sets (for example AdvBench) whose refusal rates are reported too.
    """

    harmful_train: PromptSet
    harmless_train: PromptSet
    capability_train: PromptSet
    harmful_val: PromptSet
    harmless_val: PromptSet
    harmful_test: PromptSet
    harmless_test: PromptSet
    capability_test: PromptSet
    harmful_extra: dict[str, PromptSet] = field(default_factory=dict)

    @classmethod
    def bundled(cls, *, n_train: int | None = None, n_val: int | None = None,
                n_test: int | None = None, extra: dict[str, PromptSet] | None = None) -> EvalPrompts:
        """Build the bundled sets, each cut to its first `n_train`, `n_val` or `n_test` prompts."""
        harmful, harmless, capability = (bundled_prompts(role) for role in ROLES)
        return cls(
            harmful_train=harmful.train.head(n_train),
            harmless_train=harmless.train.head(n_train),
            capability_train=capability.train.head(n_train),
            harmful_val=harmful.val.head(n_val),
            harmless_val=harmless.val.head(n_val),
            harmful_test=harmful.test.head(n_test),
            harmless_test=harmless.test.head(n_test),
            capability_test=capability.test.head(n_test),
            harmful_extra=dict(extra or {}),
        )

    def replace_sets(self, **sets: PromptSet) -> EvalPrompts:
        return replace(self, **sets)

    def to_dict(self) -> dict:
        names = ("harmful_train", "harmless_train", "capability_train", "harmful_val",
                 "harmless_val", "harmful_test", "harmless_test", "capability_test")
        sets = {name: getattr(self, name).to_dict() for name in names}
        sets["harmful_extra"] = {name: prompt_set.to_dict() for name, prompt_set in self.harmful_extra.items()}
        return sets
