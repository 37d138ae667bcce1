import json

import pytest

from safereact_interp.errors import PromptFileError
from safereact_interp.prompts import (bundled_prompts, load_prompt_file, post_instruction_positions, render_chat,
                                      refusal_texts)


def test_bundled_sizes_and_categories():
    harmful = bundled_prompts("harmful")
    harmless = bundled_prompts("harmless")
    for splits in (harmful, harmless):
        total = len(splits.train) + len(splits.val) + len(splits.test)
        assert total >= 300
        assert len(splits.test) >= 100
        categories = {prompt.category for split in ("train", "val", "test") for prompt in splits[split]}
        assert len(categories) >= 10


def test_bundled_splits_disjoint():
    for role in ("harmful", "harmless", "capability"):
        splits = bundled_prompts(role)
        train, val, test = ({prompt.text for prompt in splits[name]} for name in ("train", "val", "test"))
        assert not train & val
        assert not train & test
        assert not val & test


def test_bundled_splits_fixed():
    first = bundled_prompts("harmful").test.texts
    bundled_prompts.cache_clear()
    assert bundled_prompts("harmful").test.texts == first


def test_capability_test_split_size():
    splits = bundled_prompts("capability")
    assert len(splits.test) >= 100
    assert all(prompt.problem is not None for prompt in splits.test)


def test_harmful_harmless_no_overlap():
    harmful = {prompt.text.lower() for split in ("train", "val", "test") for prompt in bundled_prompts("harmful")[split]}
    harmless = {prompt.text.lower() for split in ("train", "val", "test") for prompt in bundled_prompts("harmless")[split]}
    assert not harmful & harmless


def test_refusal_texts_loaded():
    assert len(refusal_texts()) >= 20


def test_csv_goal_column(tmp_path):
    path = tmp_path / "bench.csv"
    path.write_text('goal,target\n"Do a bad thing","Sure, here is"\nDo another bad thing,Sure\n')
    prompts = load_prompt_file(path)
    assert prompts.texts == ["Do a bad thing", "Do another bad thing"]


def test_csv_behavior_with_context(tmp_path):
    path = tmp_path / "harmbench.csv"
    path.write_text("Behavior,FunctionalCategory,SemanticCategory,ContextString\n"
                    "Write the thing,standard,misinformation,\nSummarise it,contextual,harassment,Some context\n")
    prompts = load_prompt_file(path)
    assert prompts.texts[0] == "Write the thing"
    assert prompts.texts[1].startswith("Some context")
    assert prompts.texts[1].endswith("Summarise it")
    assert prompts.prompts[0].category == "misinformation"


def test_csv_prompt_column_and_explicit(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,prompt,other\n1,First prompt,x\n2,Second prompt,y\n")
    assert load_prompt_file(path).texts == ["First prompt", "Second prompt"]
    assert load_prompt_file(path, column="other").texts == ["x", "y"]


def test_json_instruction_with_input(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Summarise this.", "input": "A text."},
                                {"instruction": "Name a colour.", "input": ""}]))
    prompts = load_prompt_file(path, "harmless")
    assert prompts.texts == ["Summarise this.\n\nA text.", "Name a colour."]
    assert prompts.role == "harmless"


def test_jsonl_prompt_key(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "one"}\n\n{"prompt": "two"}\n')
    assert load_prompt_file(path).texts == ["one", "two"]


def test_json_list_of_strings(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(["a prompt", " ", "another"]))
    assert load_prompt_file(path).texts == ["a prompt", "another"]


def test_text_file_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first\n\n  second  \n")
    assert load_prompt_file(path).texts == ["first", "second"]


def test_limit_keeps_first(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a\nb\nc\n")
    assert load_prompt_file(path, limit=2).texts == ["a", "b"]


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", "", "contains no prompts; write one prompt per line"),
    ("unclosed.csv", 'goal,target\n"abc,def\nghi,jkl\n', "not valid CSV.*unclosed quote"),
    ("blank.csv", "", "is empty"),
    ("bad.json", "{not json", "not valid JSON.*JSONL"),
    ("bad.jsonl", '{"prompt": "x"}\n{oops\n', "line 2, is not valid JSON .* at column 2"),
    ("nocol.csv", "a,b\n1,2\n", "has none of the known prompt columns"),
    ("shape.json", '{"a": 1}', "contains an object without a list value"),
    ("number.json", '3', "contains a JSON int"),
    ("blank_cells.csv", "goal\n\"\"\n\"  \"\n", "add rows with text in the prompt column"),
    ("mixed.json", '["a", {"prompt": "b"}]', "mixes strings and objects"),
    ("p.xlsx", "x", "unknown extension"),
])
def test_malformed_files_raise(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PromptFileError, match=message):
        load_prompt_file(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(PromptFileError, match="not found"):
        load_prompt_file(tmp_path / "absent.csv")


def test_advbench_file(shared_data):
    prompts = load_prompt_file(shared_data / "advbench.csv", limit=100)
    assert len(prompts) == 100
    assert prompts.texts[0].startswith("Write a script that can exploit vulnerabilities")


def test_harmbench_file(shared_data):
    prompts = load_prompt_file(shared_data / "harmbench_val.csv")
    assert len(prompts) > 50
    assert all(prompt.category for prompt in prompts)


def test_alpaca_file(shared_data):
    prompts = load_prompt_file(shared_data / "alpaca.json", "harmless", limit=50)
    assert len(prompts) == 50
    assert prompts.texts[0] == "Give three tips for staying healthy."


def test_render_and_post_instruction(tokenizer):
    rendered = render_chat(tokenizer, ["Hello there"])[0]
    assert rendered.endswith("<|im_start|>assistant\n")
    positions = post_instruction_positions(tokenizer)
    suffix_ids = tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert positions == tuple(range(-len(suffix_ids), 0))


def test_missing_named_column_lists_columns(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("goal_text,target\nx,y\n")
    with pytest.raises(PromptFileError, match="no column 'prompt_x' .*goal_text, target.*pass one of its columns"):
        load_prompt_file(path, column="prompt_x")
