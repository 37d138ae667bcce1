"""Regenerate every figure of figures/ on the bundled model organism.

1. `safereact run` on the organism into the run folder with the settings of `make demo` (skipped when
   the folder already contains a finished run, such as the one `make demo` wrote, unless --refresh), with
   AdvBench as an extra harmful set when ../shared/data/advbench.csv exists;
2. component attribution (attribution.json) and the repaired model's validation activations (for the PCA);
3. every fig_*.py script, writing HTML + PNG + SVG + PDF into --out.

    python analyses/make_all.py [--run runs/demo] [--out figures] [--refresh]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from safereact_interp.activations import collect_residuals  # noqa: E402
from safereact_interp.artifacts import save_tensors  # noqa: E402
from safereact_interp.models import apply_adapter, load_unwrapped, wrap_model  # noqa: E402
from safereact_interp.pipeline import (RunOptions, build_prompts, load_options, stage_attribute,  # noqa: E402
                                       stage_run)
from safereact_interp.progress import tqdm_progress  # noqa: E402

SCRIPTS = ("fig_similarity_separability", "fig_amplification_masking", "fig_pca", "fig_patching",
           "fig_interventions", "fig_before_after", "fig_training", "fig_attribution")
ADVBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "advbench.csv"


def repaired_activations(run: Path) -> None:
    """Validation activations of the repaired model, next to the base and post-trained ones."""
    options = load_options(run)
    prompts = build_prompts(options)
    hf_model, tokenizer = load_unwrapped(options.posts[0], adapter=options.post_adapter, dtype=options.dtype)
    repaired = wrap_model(apply_adapter(hf_model, run / "repair" / "adapter"), tokenizer, name="repaired")
    values = {}
    for name, prompt_set in (("harmful_val", prompts.harmful_val), ("harmless_val", prompts.harmless_val)):
        values[name] = collect_residuals(repaired, prompt_set, positions=tuple(options.positions),
                                         batch_size=options.batch_size).pooled()
    save_tensors(run / "activations-repaired.safetensors", values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--out", type=Path, default=Path("figures"))
    parser.add_argument("--refresh", action="store_true", help="rerun the pipeline even if the run folder is complete")
    args = parser.parse_args()
    start = time.perf_counter()

    if args.refresh or not (args.run / "verification.json").is_file():
        options = RunOptions(extra_harmful=[str(ADVBENCH)] if ADVBENCH.is_file() else [],
                             max_new_tokens=16, capability_max_new_tokens=80)  # as in `make demo`
        stage_run(options, args.run, overwrite=True, progress=tqdm_progress, echo=print)
    if args.refresh or not (args.run / "attribution.json").is_file():
        stage_attribute(args.run)
    if args.refresh or not (args.run / "activations-repaired.safetensors").is_file():
        repaired_activations(args.run)

    args.out.mkdir(parents=True, exist_ok=True)
    for name in SCRIPTS:
        written = importlib.import_module(name).make(args.run, args.out)
        print(f"{name}: {', '.join(path.name for path in written)}")
    print(f"figures written to {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
