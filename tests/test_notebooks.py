"""Execute every notebook top to bottom on tiny models, with the parameter cell replaced."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def tiny_parameters(base: Path, post: Path, output: Path) -> dict[str, str]:
    shared = dict(BASE=repr(str(base)), POST=repr(str(post)), MAX_NEW_TOKENS="4")
    return {
        "01_diagnose_masking.ipynb": {**shared, "N_TRAIN": "10", "N_VAL": "6", "N_TEST": "4", "BOOTSTRAP": "20",
                                      "CAPABILITY_MAX_NEW_TOKENS": "6"},
        "02_patching_interventions.ipynb": {**shared, "N_TRAIN": "10", "N_PATCH": "4", "ALPHAS": "[0.0, 2.0]"},
        "03_repair_verify.ipynb": {**shared, "N_TRAIN": "10", "N_TEST": "4", "N_PATCH": "4", "STEPS": "3",
                                   "CAPABILITY_MAX_NEW_TOKENS": "6", "OUTPUT": repr(str(output))},
        "04_own_models_and_prompts.ipynb": {**shared, "POST_ADAPTER": "None", "N_PROMPTS": "4",
                                            "HARMFUL_FILE": repr(str(output / "absent.csv"))},
    }


def parameter_cell(notebook) -> int:
    for index, cell in enumerate(notebook.cells):
        if "parameters" in cell.metadata.get("tags", []):
            return index
    raise AssertionError("notebook has no cell tagged 'parameters'")


def test_every_notebook_listed():
    assert sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) == sorted(tiny_parameters(Path(), Path(), Path()))


@pytest.mark.parametrize("name", sorted(tiny_parameters(Path(), Path(), Path())))
def test_notebook_runs(name, tiny_model_dir, planted_post_dir, tmp_path):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    index = parameter_cell(notebook)
    values = tiny_parameters(tiny_model_dir, planted_post_dir, tmp_path)[name]
    original = notebook.cells[index].source
    for key in values:
        assert f"{key} =" in original, f"{name} parameter cell lacks {key}"
    notebook.cells[index].source = "\n".join(f"{key} = {value}" for key, value in values.items())
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if output.output_type == "error"]
    assert not errors
