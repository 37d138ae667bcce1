import json

import pytest

from safereact_interp.cli import main, parse_layers

FAST = ["--n-train", "10", "--n-val", "6", "--n-test", "4", "--max-new-tokens", "3",
        "--capability-max-new-tokens", "4", "--formats", "html"]
DIAGNOSIS_KEYS = {"layers", "direction_similarity", "separability_base", "separability_post", "probe_accuracy_base",
                  "probe_accuracy_post", "probe_transfer", "amplification", "capability_amplification", "masking",
                  "verdict", "layer_ranking", "refusal_rate", "capability_accuracy"}


def diagnose_args(base, post, out, *extra):
    return ["diagnose", "--base", str(base), "--post", str(post), "--out", str(out), *FAST, *extra]


def test_diagnose_writes_outputs(tiny_model_dir, planted_post_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(diagnose_args(tiny_model_dir, planted_post_dir, out)) == 0
    printed = capsys.readouterr().out
    assert "verdict:" in printed
    assert "layer    sim" in printed
    data = json.loads((out / "diagnosis.json").read_text())
    assert DIAGNOSIS_KEYS <= data.keys()
    assert set(data["refusal_rate"]["base"]) == {"harmful", "harmless"}
    assert 0.0 <= data["capability_accuracy"]["post"] <= 1.0
    for name in ("similarity", "separability", "amplification", "masking"):
        assert (out / "figures" / f"{name}.html").is_file()
    assert (out / "report.html").is_file()
    assert (out / "directions.safetensors").is_file()


def test_existing_out_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(diagnose_args(tiny_model_dir, tiny_model_dir, out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


def test_overwrite_replaces(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert main(diagnose_args(tiny_model_dir, tiny_model_dir, out, "--overwrite")) == 0
    assert not (out / "old.txt").exists()
    assert (out / "diagnosis.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--layers", "2,7"], "layer index 7 is out of range"),
    (["--harmful-file", "/nonexistent/prompts.csv"], "not found"),
])
def test_bad_input_leaves_nothing(tiny_model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main(diagnose_args(tiny_model_dir, tiny_model_dir, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert not list(tmp_path.glob(".run.*"))


def test_identical_prompt_files_fail_early(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Tell me about topic number {index}." for index in range(40)) + "\n")
    out = tmp_path / "run"
    args = diagnose_args(tiny_model_dir, tiny_model_dir, out, "--harmful-file", str(prompts),
                         "--harmless-file", str(prompts))
    assert main(args) == 2
    assert "harmful and harmless prompts are the same" in capsys.readouterr().err
    assert not out.exists()


def test_missing_model_path(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(diagnose_args(tmp_path / "missing-model", tmp_path / "missing-model", out)) == 2
    assert "not found" in capsys.readouterr().err
    assert not out.exists()


def test_mismatched_pair(tiny_model_dir, tmp_path, capsys, tokenizer):
    from conftest import build_tiny_model

    other = build_tiny_model(tmp_path / "deeper", n_layers=5, tokenizer=tokenizer)
    assert main(diagnose_args(tiny_model_dir, other, tmp_path / "run")) == 2
    assert "layer count differs" in capsys.readouterr().err


def test_custom_prompt_files(tiny_model_dir, tmp_path):
    harmful = tmp_path / "harmful.txt"
    harmful.write_text("\n".join(f"Do harmful thing number {index}" for index in range(20)))
    harmless = tmp_path / "harmless.jsonl"
    harmless.write_text("\n".join(json.dumps({"instruction": f"Explain idea {index}"}) for index in range(20)))
    out = tmp_path / "run"
    assert main(diagnose_args(tiny_model_dir, tiny_model_dir, out, "--harmful-file", str(harmful),
                              "--harmless-file", str(harmless))) == 0
    data = json.loads((out / "diagnosis.json").read_text())
    assert data["prompts"]["harmful_train"]["n"] == 10


def test_stage_without_diagnosis(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["patch", "--run", str(tmp_path)]) == 2
    assert "no diagnosis" in capsys.readouterr().err


def test_stage_on_non_run_folder(tmp_path, capsys):
    assert main(["repair", "--run", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "not a run folder" in error
    assert f"--out {tmp_path}" in error
    (tmp_path / "notes.txt").write_text("not a run")
    assert main(["attribute", "--run", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    # a folder with other files cannot receive a run, so the hint names a new one
    assert "not a run folder" in error
    assert "--out NEW_FOLDER" in error


def test_stage_on_missing_folder(tmp_path, capsys):
    assert main(["verify", "--run", str(tmp_path / "absent")]) == 2
    assert "not found" in capsys.readouterr().err


def test_full_run_on_tiny_models(tiny_model_dir, planted_post_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--base", str(tiny_model_dir), "--post", str(planted_post_dir), "--out", str(out), *FAST,
            "--patch-prompts", "4", "--steps", "3", "--checkpoint-every", "2", "--kl-prompts", "3", "--merge"]
    assert main(args) == 0
    verification = json.loads((out / "verification.json").read_text())
    assert set(verification["models"]) == {"base", "post", "repaired", "activation_addition", "refusal_lora"}
    for row in verification["models"].values():
        assert {"harmful_refusal_rate", "harmful_refusal_rate_advbench", "harmless_refusal_rate",
                "capability_accuracy", "kl_to_post"} <= row.keys()
    for key in ("fraction_restored_by_patching", "ablation_refusal_drop", "trainable_parameter_fraction",
                "repair_seconds"):
        assert key in verification
    assert (out / "repair" / "adapter" / "adapter_config.json").is_file()
    assert (out / "repair" / "merged" / "config.json").is_file()
    assert len((out / "repair" / "log.jsonl").read_text().splitlines()) == 3
    patching = json.loads((out / "patching.json").read_text())
    assert len(patching["selection"]["layers"]) == 3
    report = (out / "report.html").read_text()
    for heading in ("Diagnosis", "Activation patching", "Repair", "Verification"):
        assert heading in report
    for name in ("patching", "interventions", "training", "before_after"):
        assert (out / "figures" / f"{name}.html").is_file()


def test_repair_rejects_bad_layers(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import safereact_interp.pipeline as pipeline

    out = tmp_path / "run"
    assert main(diagnose_args(tiny_model_dir, tiny_model_dir, out)) == 0

    def never(*args, **kwargs):
        raise AssertionError("models loaded before the layer check")

    monkeypatch.setattr(pipeline, "load_run_models", never)
    assert main(["repair", "--run", str(out), "--layers", "1,12", "--steps", "2"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_run_checks_layers_before_loading(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import safereact_interp.pipeline as pipeline

    def never(*args, **kwargs):
        raise AssertionError("models loaded before the layer check")

    monkeypatch.setattr(pipeline, "load_run_models", never)
    out = tmp_path / "run"
    args = ["run", "--base", str(tiny_model_dir), "--post", str(tiny_model_dir), "--out", str(out),
            "--repair-layers", "1,12"]
    assert main(args) == 2
    assert "layer index 12 is out of range: the model has 4 layers" in capsys.readouterr().err
    assert not out.exists()


def test_parse_layers():
    assert parse_layers("20,24,28") == [20, 24, 28]
    assert parse_layers("8-10,12") == [8, 9, 10, 12]
    assert parse_layers("-1") == [-1]


def test_run_rejects_overwrite_with_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--overwrite", "--resume"]) == 2
    assert "--overwrite and --resume contradict" in capsys.readouterr().err
    assert not out.exists()


def test_serial_run_matches_parallel(tiny_model_dir, planted_post_dir, tmp_path):
    tables = {}
    for mode in ("parallel", "serial"):
        out = tmp_path / mode
        args = ["run", "--base", str(tiny_model_dir), "--post", str(planted_post_dir), "--out", str(out), *FAST,
                "--patch-prompts", "4", "--steps", "2", "--kl-prompts", "3"]
        assert main(args + (["--serial"] if mode == "serial" else [])) == 0
        tables[mode] = json.loads((out / "verification.json").read_text())["models"]
    assert tables["parallel"].keys() == tables["serial"].keys()
    # One thread and two can sum in different orders, so values agree up to float rounding.
    for name, row in tables["serial"].items():
        for key, value in row.items():
            expected = value if value is None else pytest.approx(value, rel=1e-3, abs=1e-4)
            assert tables["parallel"][name][key] == expected, (name, key)


def test_sigterm_removes_staging_folder(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import os
    import signal

    from safereact_interp import pipeline

    def terminated_midway(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the run")

    monkeypatch.setattr(pipeline, "diagnose", terminated_midway)
    out = tmp_path / "run"
    handler = signal.getsignal(signal.SIGTERM)
    assert main(diagnose_args(tiny_model_dir, tiny_model_dir, out)) == 143
    assert "terminated" in capsys.readouterr().err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left beside it
    assert signal.getsignal(signal.SIGTERM) == handler
