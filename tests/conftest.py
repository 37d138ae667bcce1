"""Shared fixtures: tiny real models built from a config and saved to a temporary folder.

The tiny models are real `transformers` Llama models with a real byte-level BPE tokenizer and a
ChatML chat template, saved with `save_pretrained` and loaded through the same `load_model` path
a user's hub model takes. They are random, so tests check mechanics and planted ground truth, not
behaviour.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest
import torch

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from safereact_interp.prompts import bundled_prompts, refusal_texts

    corpus = refusal_texts() + ["Sure, here is how to do it.", "Here is a step-by-step guide.", "<think>", "</think>"]
    for role in ("harmful", "harmless", "capability"):
        for split in ("train", "val", "test"):
            corpus.extend(bundled_prompts(role)[split].texts)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus * 2, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   unk_token="<unk>")
    fast.chat_template = CHATML
    return fast


def build_tiny_model(folder: Path, *, seed: int = 0, n_layers: int = 4, d_model: int = 64, tokenizer=None) -> Path:
    """Save a random tiny Llama model and its tokenizer to `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model,
                         num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-base"), seed=0, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_post_dir(tmp_path_factory, tokenizer) -> Path:
    """A second tiny model of the same shape: stands in for a post-trained model."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-post"), seed=1, tokenizer=tokenizer)


def build_planted_post(base_dir: Path, folder: Path, *, scale: float = 1.6, seed: int = 7) -> Path:
    """A "post-trained" copy of a tiny model: blocks 1 and up get amplified MLP outputs and perturbed
    attention outputs; embeddings, final norm and unembedding stay the base model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.down_proj.weight.mul_(scale)
            weight = layer.self_attn.o_proj.weight
            weight.add_(0.3 * weight.std() * torch.randn(weight.shape, generator=generator))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def planted_post_dir(tmp_path_factory, tiny_model_dir) -> Path:
    return build_planted_post(tiny_model_dir, tmp_path_factory.mktemp("tiny-planted-post"))


@pytest.fixture(scope="session")
def planted_pair(tiny_model_dir, planted_post_dir):
    from safereact_interp.models import load_pair

    return load_pair(str(tiny_model_dir), str(planted_post_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from safereact_interp.models import load_model

    return load_model(str(tiny_model_dir), name="base", dtype="float32", device="cpu")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"public prompt files not found at {SHARED_DATA} (only present beside the development checkout)")
    return SHARED_DATA
