"""Benchmark the block-diffusion sampler with and without key/value reuse.

Run: .venv/bin/python bench/bench_block_sampler.py [--device cpu|cuda] [--reps N] [--threads N]

The real sampler (`dllm_plugin.block_sampler.generate_bd3lm`) on random models built
from configs, one prompt at a time, greedy, one token per denoising step (steps =
max_new_tokens, the preview/eval setting). `reuse`: the prefix's keys and values are
cached as blocks are committed and each denoising forward reads the block's B tokens;
`full`: each denoising forward reads prefix + block under the block-causal mask. Both
give identical tokens (checked here, and in tests/test_bd3lm.py). Time: median of
`--reps` calls after one warm-up call. Forwards: the number of model calls and the mean
number of tokens each reads. Results: a table on stdout and JSON in
bench/results/block_sampler.json. The machine's load average is printed: rerun on a
quiet machine, since shared CPUs make small kernels noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "block_sampler.json"

from dllm_plugin.block_sampler import generate_bd3lm  # noqa: E402
from dllm_plugin.sampling import SamplingConfig  # noqa: E402

# name -> (family, hidden, layers, heads, kv heads, vocab)
MODELS = {
    "a2d-qwen2 d256 L4": ("qwen2", 256, 4, 8, 2, 4096),
    "llada d256 L4": ("llada", 256, 4, 8, 8, 4096),
}
# (prompt tokens, new tokens, block size)
SHAPES = [(256, 64, 32), (256, 64, 8), (768, 64, 32)]


def build(family: str, hidden: int, layers: int, heads: int, kv: int, vocab: int):
    torch.manual_seed(0)
    if family == "llada":
        from dllm_plugin.models.llada import LLaDAConfig, LLaDAModelLM

        config = LLaDAConfig(
            d_model=hidden, n_heads=heads, n_kv_heads=kv, n_layers=layers,
            mlp_hidden_size=3 * hidden, vocab_size=vocab, embedding_size=vocab,
            max_sequence_length=4096, mask_token_id=vocab - 1,
        )  # fmt: skip
        return LLaDAModelLM(config).eval()
    from dllm_plugin.models.a2d import A2DQwen2Config, A2DQwen2ForMaskedLM

    config = A2DQwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        max_position_embeddings=4096,
    )  # fmt: skip
    return A2DQwen2ForMaskedLM(config).eval()


def count_forwards(model) -> list[int]:
    seen: list[int] = []
    model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    return seen


def run(model, prompt, config, reuse: bool, reps: int):
    mask = model.get_output_embeddings().weight.shape[0] - 1
    kwargs = dict(mask_id=mask, stop_ids=[], pad_id=None, config=config, reuse_cache=reuse)
    seen = count_forwards(model)
    tokens = generate_bd3lm(model, [prompt], **kwargs)  # warm-up
    calls, read = len(seen), sum(seen)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        generate_bd3lm(model, [prompt], **kwargs)
        times.append(time.perf_counter() - start)
    model._forward_pre_hooks.clear()
    return tokens, statistics.median(times), calls, read / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    rows = []
    header = f"{'model':<20} {'prompt':>6} {'new':>4} {'B':>3} {'mode':>6} {'s':>8} {'calls':>6} {'tok/call':>8}"
    print(header)
    for name, spec in MODELS.items():
        model = build(*spec).to(args.device)
        for n_prompt, new, block in SHAPES:
            prompt = torch.randint(
                0, spec[-1] - 1, (n_prompt,), generator=torch.Generator().manual_seed(1)
            ).tolist()
            config = SamplingConfig(max_new_tokens=new, steps=new, block_size=block)
            results = {}
            for mode, reuse in (("reuse", True), ("full", False)):
                tokens, seconds, calls, per_call = run(model, prompt, config, reuse, args.reps)
                results[mode] = tokens
                rows.append(
                    dict(model=name, prompt=n_prompt, new=new, block=block, mode=mode,
                         seconds=seconds, calls=calls, tokens_per_call=per_call)
                )  # fmt: skip
                print(
                    f"{name:<20} {n_prompt:>6} {new:>4} {block:>3} {mode:>6} {seconds:>8.3f} {calls:>6} {per_call:>8.1f}"
                )
            assert results["reuse"] == results["full"], "reuse changed the tokens"
            speedup = rows[-1]["seconds"] / rows[-2]["seconds"]
            print(f"{'':<20} speed-up with reuse: {speedup:.1f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"load_average": os.getloadavg(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
