"""Residual-stream collection at every layer: the toolkit against a plain HF forward pass.

Both sides run in one process on the organism's base model, over the same 128 prompts (64 harmful,
64 harmless), in the same left-padded batches. The toolkit collects `blocks.{l}.hook_resid_post`
through TransformerLens hooks at the last prompt token; the baseline calls the HF model with
`output_hidden_states=True` and slices the same token. Timings alternate between the two sides
and the median of the repeats is reported. The last line printed is the ratio toolkit / HF.

    python benchmarks/bench_activations.py [--prompts 128] [--batch-size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from safereact_interp.activations import collect_residuals
from safereact_interp.models import wrap_model
from safereact_interp.organism import load_organism_hf
from safereact_interp.prompts import bundled_prompts, encode, left_pad, length_sorted_batches, render_chat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    half = args.prompts // 2
    texts = bundled_prompts("harmful").train.texts[:half] + bundled_prompts("harmless").train.texts[:args.prompts - half]
    toolkit_model = wrap_model(*load_organism_hf("base", dtype="float32", device="cpu"), name="base")
    hf_model, tokenizer = load_organism_hf("base", dtype="float32", device="cpu")
    tokenizer.padding_side = "left"
    sequences = encode(tokenizer, render_chat(tokenizer, texts))
    order = length_sorted_batches([len(sequence) for sequence in sequences], args.batch_size)
    batches = [left_pad([sequences[index] for index in batch], tokenizer.pad_token_id) for batch in order]

    def run_toolkit() -> torch.Tensor:
        return collect_residuals(toolkit_model, texts, batch_size=args.batch_size).values

    @torch.inference_mode()
    def run_hf() -> list[torch.Tensor]:
        outputs = []
        for ids, mask in batches:
            hidden = hf_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            outputs.append(torch.stack([state[:, -1] for state in hidden[1:]], dim=1).float().cpu())
        return outputs

    # Both sides must compute the same activations, or the timing compares different work.
    toolkit_values = run_toolkit()[:, :, -1]
    hf_values = torch.cat(run_hf())[torch.argsort(torch.tensor([index for batch in order for index in batch]))]
    # HF applies the final norm to the last entry of hidden_states, so that layer is left out.
    difference = (toolkit_values[:, :-1] - hf_values[:, :-1]).abs().max().item()
    if difference > 1e-3:
        raise SystemExit(f"toolkit and HF activations differ by up to {difference:.2e}; the timing would be meaningless")
    toolkit_times, hf_times = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run_toolkit()
        toolkit_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        run_hf()
        hf_times.append(time.perf_counter() - start)

    toolkit, hf = statistics.median(toolkit_times), statistics.median(hf_times)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    print(f"{args.prompts} prompts, {toolkit_model.n_layers} layers, batch size {args.batch_size}, "
          f"median of {args.repeats} repeats")
    print(f"max abs difference of the activations (all but the last layer): {difference:.1e}")
    print(f"toolkit collect_residuals:        {toolkit:.2f} s  (runs: {', '.join(f'{t:.2f}' for t in toolkit_times)})")
    print(f"HF forward, output_hidden_states: {hf:.2f} s  (runs: {', '.join(f'{t:.2f}' for t in hf_times)})")
    print(f"ratio toolkit / HF: {toolkit / hf:.3f}")


if __name__ == "__main__":
    main()
