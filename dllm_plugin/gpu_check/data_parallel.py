"""Several processes through the project's launcher: the same loss as one process.

Each check is a real job through `main.py` (config, launch plan, accelerate launch,
data, Trainer, outputs) on the family's "tiny-2" model with its character tokenizer and
the embedded demo rows. The reference trains in one process with gradient accumulation
2; the others in two processes (DDP, FSDP, DeepSpeed ZeRO-3) with accumulation 1, so
every optimizer step sees the same global batch. The trainers key their noise by the
row's place in the global batch, so step 1's loss must agree: exactly up to float
summation order in fp32, within `BF16_RTOL` in bf16.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PLUGIN_DIR
from .workloads import Workload

__all__ = ["BF16_RTOL", "FP32_RTOL", "LauncherRun", "launcher_checks", "strategies_available"]

BF16_RTOL = 1e-2  # bf16 keeps 8 significant bits; summation order differs across processes
FP32_RTOL = 1e-4
STEPS = 3
RUN_TIMEOUT_S = 600
DEMO_ROWS = PLUGIN_DIR / "dllm_plugin" / "demo" / "chat_demo.jsonl"


@dataclass
class LauncherRun:
    """One job through the launcher and how its step-1 loss compares with the reference."""

    family: str
    strategy: str  # "reference" (1 process, accumulation 2), ddp, fsdp, deepspeed_zero3
    processes: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    reference_loss: float | None = None
    rel_diff: float | None = None
    tolerance: float | None = None

    @property
    def passed(self) -> bool:
        if self.error is not None or not self.losses:
            return False
        if not all(math.isfinite(x) for x in self.losses):
            return False
        return self.rel_diff is None or self.rel_diff <= (self.tolerance or 0.0)


def strategies_available(device: str) -> list[str]:
    """DDP always; FSDP on CUDA; ZeRO-3 on CUDA when DeepSpeed is installed."""
    if device != "cuda":
        return ["ddp"]
    found = ["ddp", "fsdp"]
    if importlib.util.find_spec("deepspeed") is not None:
        found.append("deepspeed_zero3")
    return found


def model_folder(workload: Workload, root: Path) -> Path:
    """The tiny-2 model (bf16 weights) with its character tokenizer."""
    from .runner import build_model_folder

    folder = build_model_folder(workload, "tiny-2", root)
    if not (folder / "tokenizer_config.json").is_file():
        workload.tiny_tokenizer().save_pretrained(folder)
    return folder


def job_file(
    folder: Path, model: Path, workload: Workload, device: str, strategy: str, processes: int
) -> Path:
    """A job: `processes` processes x accumulation (2 / processes), 2 rows each, STEPS steps."""
    config: dict[str, Any] = {
        "model_name": str(model),
        "dataset_name": str(DEMO_ROWS),
        "training_method": workload.method,
        "train_device": device,
        "dtype": "bfloat16" if device == "cuda" else "float32",
        "distributed_strategy": "ddp" if strategy == "reference" else strategy,
        "batch_size": 2,
        "gradient_accumulation_steps": 2 // processes,
        "train_steps": STEPS,
        "max_length": 256,
        "learning_rate": 1e-3,
        "learning_rate_schedule": "constant",
        "warmup_ratio": 0,
        "logging_steps": 1,
        "eval_strategy": "no",
        "eval_split_ratio": 0,
        "save_steps": 1000,
        "num_preview_samples": 0,
        "log_to_wandb": False,
        "num_proc": 1,
        "seed": 7,
        "output_dir": str(folder / "out"),
    }
    if device == "cuda":
        config["gpu_ids"] = ",".join(str(i) for i in range(processes))
    else:
        config["num_processes"] = processes
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.json"
    path.write_text(json.dumps({"config": config}), encoding="utf-8")
    return path


def run_job(job: Path, timeout: int = RUN_TIMEOUT_S) -> tuple[list[float], str | None]:
    """`python main.py --input_file job`: per-step losses, or why it failed."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    try:
        proc = subprocess.run(
            [sys.executable, str(PLUGIN_DIR / "main.py"), "--input_file", str(job)],
            cwd=job.parent, env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return [], f"no result within {timeout} s"
    summary = job.parent / "out" / "run_summary.json"
    if proc.returncode != 0 or not summary.is_file():
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        return [], lines[-1] if lines else f"exit status {proc.returncode}"
    history = json.loads(summary.read_text(encoding="utf-8"))["log_history"]
    steps = sorted((h["step"], float(h["loss"])) for h in history if "loss" in h and "step" in h)
    return [loss for _, loss in steps], None


def launcher_checks(
    workloads: list[Workload], device: str, strategies: list[str], root: Path
) -> list[LauncherRun]:
    """Per family: the one-process reference, then each strategy on two processes."""
    runs: list[LauncherRun] = []
    for workload in workloads:
        if not workload.tiny_tokens:
            continue
        model = model_folder(workload, root / "models")
        reference: LauncherRun | None = None
        for strategy in ["reference", *strategies]:
            processes = 1 if strategy == "reference" else 2
            run = LauncherRun(workload.family, strategy, processes)
            folder = root / f"{workload.family}-{strategy}"
            start = time.perf_counter()
            run.losses, run.error = run_job(
                job_file(folder, model, workload, device, strategy, processes)
            )
            run.seconds = time.perf_counter() - start
            if strategy == "reference":
                reference = run
            elif reference is not None and reference.losses and run.losses:
                run.reference_loss = reference.losses[0]
                run.rel_diff = abs(run.losses[0] - run.reference_loss) / abs(run.reference_loss)
                run.tolerance = BF16_RTOL if device == "cuda" else FP32_RTOL
            elif run.error is None:
                run.error = "the one-process reference failed"
            runs.append(run)
    return runs
