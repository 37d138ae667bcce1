import importlib.util

import pytest
import torch

from safereact_interp.errors import ModelLoadError, PairMismatchError
from safereact_interp.models import check_pair, load_model, load_pair, resolve_source


def test_load_local_folder(tiny_model):
    assert tiny_model.n_layers == 4
    assert tiny_model.d_model == 64
    assert tiny_model.tokenizer.padding_side == "left"
    assert "blocks.3.hook_resid_post" in tiny_model.bridge.hook_dict


def test_missing_path_raises(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "no-such-model"))


def test_folder_without_config_raises(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_missing_gguf_file_raises(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file .* not found"):
        resolve_source(str(tmp_path / "model.gguf"))


def test_gguf_without_package_raises(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "gguf" else real_find_spec(name, *args))
    with pytest.raises(ModelLoadError, match="pip install gguf"):
        load_model(str(path))


def test_unknown_dtype_raises(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(str(tiny_model_dir), dtype="float8")


def test_unknown_organism_part_raises():
    with pytest.raises(ModelLoadError, match="organism:base or organism:post"):
        load_model("organism:teacher")


def test_pair_of_identical_models(tiny_model_dir):
    pair = load_pair(str(tiny_model_dir), str(tiny_model_dir), dtype="float32", device="cpu")
    assert pair.base is not pair.post


def test_layer_mismatch_raises(tmp_path, tiny_model, tokenizer):
    from conftest import build_tiny_model

    other = load_model(str(build_tiny_model(tmp_path / "deep", n_layers=5, tokenizer=tokenizer)))
    with pytest.raises(PairMismatchError, match="layer count differs: base 4, post-trained 5"):
        check_pair(tiny_model, other)


def test_width_and_vocab_mismatch_raise(tmp_path, tiny_model):
    from conftest import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<extra_token>"])
    other = load_model(str(build_tiny_model(tmp_path / "wide", d_model=32, tokenizer=tokenizer)))
    with pytest.raises(PairMismatchError) as error:
        check_pair(tiny_model, other)
    assert "d_model" in str(error.value)
    assert "vocabulary differs" in str(error.value)


def test_chat_template_mismatch_raises(tmp_path, tiny_model, tokenizer):
    from conftest import build_tiny_model

    folder = build_tiny_model(tmp_path / "other-template", tokenizer=tokenizer)
    other = load_model(str(folder))
    other.tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    with pytest.raises(PairMismatchError, match="chat templates render differently"):
        check_pair(tiny_model, other)


def test_export_reloads(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    folder = tiny_model.export(tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, tiny_model.hf_model(ids).logits, atol=1e-5)


def test_fused_attention_outside_eager_block(tiny_model):
    from safereact_interp.models import eager_attention

    ids = torch.tensor([[5, 9, 17, 33, 2]])
    patterns = []
    hook = ("blocks.0.attn.hook_pattern", lambda activation, hook: patterns.append(activation) or activation)
    assert tiny_model.hf_model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        fused = tiny_model.hf_model(ids).logits
        with eager_attention(tiny_model), tiny_model.bridge.hooks(fwd_hooks=[hook]):
            eager = tiny_model.hf_model(ids).logits
    assert tiny_model.hf_model.config._attn_implementation == "sdpa"
    assert len(patterns) == 1
    assert torch.allclose(fused, eager, atol=1e-5)


def test_gguf_file_parsed_once_per_load(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from safereact_interp.models import _gguf_parsed_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    original = gguf.GGUFReader
    with _gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(path) is first
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert gguf.GGUFReader is original
    assert gguf.GGUFReader(path) is not first
    assert np.array_equal(np.asarray(first.tensors[0].data).reshape(3, 4), np.arange(12).reshape(3, 4))
