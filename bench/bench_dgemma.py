"""Benchmark a DiffusionGemma training step: chunked head/CE and self-conditioning vs the
model's own full logits, with and without self-conditioning.

Run (from the repository root):

    .venv/bin/python bench/bench_dgemma.py
    .venv/bin/python bench/bench_dgemma.py --device cuda --dtype bfloat16   # on a GPU

Workload (DiffusionGemma-shaped, small enough for a CPU): the real vocabulary (262144),
soft-cap 30 and canvas 256; hidden 256, 2 layers (one sliding-window, one full), 8
experts (top 2), random weights; full fine-tuning with fp32 master weights. Batch of 2
rows: a 128-token prompt each, answers of 200 and 380 tokens, filled with EOS to whole
canvases (256 and 512), so the encoder reads 640 positions per row and every row has a
256-token canvas scored.

What is timed: one optimizer step through the real trainer code, as Trainer.train runs
it: `DiffusionGemmaTrainer.training_step` (compute_loss + backward), gradient clipping,
AdamW step, zero_grad. The noise is keyed by the step, so every mode draws the same.

Modes:
  chunked       score_masked_only true: the encoder and canvas CE through the chunked,
                soft-capped head (no [n, V] logits), pass 1's prediction turned into
                self-conditioning input chunk by chunk;
  full          score_masked_only false: the model's own logits everywhere (pass 1's
                [b, 256, V] fp32 logits handed to the decoder, pass 2's logits, the
                encoder's [b, S, V]);
  *-nosc        the same with pass 1 removed (the decoder runs once, no self-
                conditioning): the difference to the mode above is what self-conditioning
                costs. Not a user option; the benchmark disables the hook.
Each mode runs in a fresh subprocess. Peak memory on CPU: the ru_maxrss high-water mark
minus the RSS after the imports (model, gradients and AdamW states included, the same in
every mode), with MALLOC_MMAP_THRESHOLD_=65536 so freed blocks leave RSS; on CUDA:
torch.cuda.max_memory_allocated minus the allocation after the imports.
Step time: the median of --reps steps after --warmup steps (--threads N: torch CPU
threads; on a shared, overloaded machine one thread is often faster). Results: a table on stdout
and JSON in bench/results/dgemma.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "dgemma.json"
MODES = ("chunked", "full", "chunked-nosc", "full-nosc")
VOCAB, HIDDEN, CANVAS = 262144, 256, 256
PROMPT, ANSWERS = 128, (200, 380)
REPLY = "@@bench "


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_model() -> Any:
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(0)
    text = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        global_head_dim=128,
        num_global_key_value_heads=1,
        sliding_window=1024,
        layer_types=["sliding_attention", "full_attention"],
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=HIDDEN // 2,
        use_bidirectional_attention="vision",
    )
    vision = dict(
        model_type="gemma4_vision",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=16,
        position_embedding_size=64,
        pooling_kernel_size=1,
    )
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=CANVAS)
    return DiffusionGemmaForBlockDiffusion(config)


def synthetic_batch() -> dict[str, Any]:
    import torch

    from dllm_plugin.data.collators import CanvasCollator

    gen = torch.Generator().manual_seed(1234)
    features = []
    for answer in ANSWERS:
        ids = torch.randint(3, VOCAB, (PROMPT + answer,), generator=gen).tolist()
        features.append({"input_ids": ids, "labels": ids, "prompt_len": PROMPT})
    return CanvasCollator(pad_token_id=0, eos_token_id=1, block_size=CANVAS)(features)


@contextlib.contextmanager
def no_self_conditioning() -> Any:
    """Remove pass 1 (measurement only): the decoder runs once, with no self-conditioning."""
    from dllm_plugin.diffusion import diffusion_gemma_recipe

    original = diffusion_gemma_recipe._SelfConditioning.installed

    @contextlib.contextmanager
    def once(self):
        yield

    diffusion_gemma_recipe._SelfConditioning.installed = once
    try:
        yield
    finally:
        diffusion_gemma_recipe._SelfConditioning.installed = original


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Set up one mode in this fresh process, run the steps, return the measurements."""
    import torch

    sys.path.insert(0, str(ROOT))
    from dllm_plugin.diffusion_gemma_trainer import (
        DiffusionGemmaTrainer,
        DiffusionGemmaTrainingArguments,
    )
    from dllm_plugin.models.diffusion_gemma import prepare_base

    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    cuda = spec["device"].startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    baseline = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    model = build_model().to(spec["device"])
    prepare_base(model)
    out = tempfile.TemporaryDirectory()
    args = DiffusionGemmaTrainingArguments(
        output_dir=out.name,
        report_to=[],
        use_cpu=not cuda,
        bf16=spec["dtype"] == "bfloat16",
        per_device_train_batch_size=len(ANSWERS),
        learning_rate=1e-5,
        seed=0,
        score_masked_only=spec["mode"].startswith("chunked"),
    )
    trainer = DiffusionGemmaTrainer(model=model, args=args)
    trainer.create_optimizer()
    batch = {k: v.to(spec["device"]) for k, v in synthetic_batch().items()}
    times = []
    context = no_self_conditioning() if spec["mode"].endswith("nosc") else contextlib.nullcontext()
    with context:
        for step in range(spec["warmup"] + spec["reps"]):
            trainer.state.global_step = step
            start = time.perf_counter()
            counts = trainer._get_num_items_in_batch([batch], trainer.args.device)
            trainer.training_step(model, batch, counts)
            trainer._clip_grad_norm(model)
            trainer.optimizer.step()
            model.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.cleanup()
    timed = times[spec["warmup"] :]
    return {
        "mode": spec["mode"],
        "step_s": statistics.median(timed),
        "step_times_s": timed,
        "peak_mb": max(peak - baseline, 0) / 2**20,
        "params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
    }


def run_mode(mode: str, common: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TOKENIZERS_PARALLELISM="false")
    spec = json.dumps({**common, "mode": mode})
    proc = subprocess.run(
        [sys.executable, __file__, "--serve", spec],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(REPLY)]
    if proc.returncode != 0 or not lines:
        return {"mode": mode, "error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(lines[-1][len(REPLY) :])


def analytic_mb(batch_rows: int, seq: int) -> dict[str, float]:
    """Sizes of the logit tensors each path materialises (fp32), in MiB."""
    per_position = VOCAB * 4 / 2**20
    return {
        "canvas_logits_one_pass": batch_rows * CANVAS * per_position,
        "encoder_logits": batch_rows * seq * per_position,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.serve:
        print(REPLY + json.dumps(worker(json.loads(args.serve))), flush=True)
        return
    common = {
        "device": args.device,
        "dtype": args.dtype,
        "reps": args.reps,
        "warmup": args.warmup,
        "threads": args.threads,
    }
    load_before = os.getloadavg()
    results = [run_mode(mode, common) for mode in args.modes]
    seq = PROMPT + max(-(-a // CANVAS) * CANVAS for a in ANSWERS)
    sizes = analytic_mb(len(ANSWERS), seq)
    print(
        f"DiffusionGemma-shaped step: vocab {VOCAB}, hidden {HIDDEN}, 2 layers, 8 experts, "
        f"batch {len(ANSWERS)} x {seq} encoder positions, canvas {CANVAS}, "
        f"{args.device} {args.dtype}, {results[0].get('threads')} threads; "
        f"load average before {load_before[0]:.1f}"
    )
    print(f"{'mode':<14}{'step s':>10}{'peak MB':>10}")
    for r in results:
        if "error" in r:
            print(f"{r['mode']:<14} failed: {r['error'].splitlines()[-1] if r['error'] else ''}")
            continue
        print(f"{r['mode']:<14}{r['step_s']:>10.2f}{r['peak_mb']:>10.0f}")
    by = {r["mode"]: r for r in results if "error" not in r}
    for path in ("chunked", "full"):
        if path in by and f"{path}-nosc" in by:
            cost = by[path]["peak_mb"] - by[f"{path}-nosc"]["peak_mb"]
            print(f"self-conditioning costs {cost:.0f} MB peak on the {path} path")
    print(
        f"fp32 logits per pass over the canvases: {sizes['canvas_logits_one_pass']:.0f} MiB; "
        f"encoder logits: {sizes['encoder_logits']:.0f} MiB"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "results": results,
                "analytic_mb": sizes,
                "load_before": load_before,
                "load_after": os.getloadavg(),
                "common": common,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
