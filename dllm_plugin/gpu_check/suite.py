"""One device's check, top to bottom: peak, runs, checks, memory model, plan table.

`run_device` trains every run of the plan on one device (the one this process sees)
and returns a `DeviceReport`; `launcher_report` runs the multi-process checks. Neither
prints tables (report.py does); progress goes to stderr, one line per run.
"""

from __future__ import annotations

import functools
import platform
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checks import Check, launcher_check, memory_check, precision_check, run_checks
from .data_parallel import LauncherRun, launcher_checks, strategies_available
from .measure import matmul_peak
from .memory_model import (
    Fit,
    Point,
    StaticMemory,
    fit_points,
    largest_batch,
    plan_lengths,
    static_memory,
)
from .runner import RunResult, build_model_folder, quiet_transformers, run_once
from .workloads import MODES, WORKLOADS, Plan, RunPlan, plan_runs

__all__ = [
    "BUDGET_SHARE",
    "DeviceReport",
    "PlanRow",
    "four_bit_support",
    "launcher_report",
    "memory_budget",
    "run_device",
]

BUDGET_SHARE = 0.9  # of the memory free at the start: the allocator's reserve needs the rest


@dataclass
class PlanRow:
    """The largest batch per max_length for a released model in one mode."""

    model: str
    mode: str
    fixed_gb: float
    gradient_gb: float
    activation_kb_per_token: float
    largest_batch: dict[int, int]


@dataclass
class DeviceReport:
    device: str
    name: str
    plan: str
    memory_total: float
    budget: float
    matmul_peak: dict[str, Any]
    environment: dict[str, str]
    runs: list[RunResult] = field(default_factory=list)
    fits: dict[str, Fit | str] = field(default_factory=dict)
    plan_rows: list[PlanRow] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0


def environment() -> dict[str, str]:
    """Versions a result depends on."""
    import accelerate
    import peft
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "cuda": str(torch.version.cuda),
    }
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except Exception:  # absent, or present without usable kernels
        env["bitsandbytes"] = "not usable"
    return env


def memory_budget(device: torch.device) -> tuple[float, float]:
    """(total, budget) bytes: budget = BUDGET_SHARE of what is free now."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what this process cached is free for a training job
        free, total = torch.cuda.mem_get_info(device)
        return float(total), BUDGET_SHARE * free
    info = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = float(value.split()[0]) * 1024
    return info["MemTotal"], BUDGET_SHARE * info.get("MemAvailable", info["MemFree"])


def four_bit_support(device: torch.device) -> str | None:
    """None when 4-bit runs here, else why not (bitsandbytes needs its CUDA kernels)."""
    if device.type != "cuda":
        return "4-bit runs need CUDA"
    from ..models.loading import check_bitsandbytes

    try:
        check_bitsandbytes()
    except Exception as e:
        return str(e)
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def run_device(
    plan: Plan, device: torch.device, families: tuple[str, ...], models_dir: Path
) -> DeviceReport:
    """Every run of the plan on this device, then the checks, fits and plan table."""
    start = time.perf_counter()
    peak = matmul_peak(device, torch.bfloat16, size=plan.matmul_size)
    total, budget = memory_budget(device)
    report = DeviceReport(
        str(device), device_name(device), plan.name, total, budget, peak, environment()
    )
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        report.checks.append(
            Check("bf16 on this GPU", False, "not supported: the checked modes train in bf16")
        )
        return report
    no_4bit = four_bit_support(device)
    if no_4bit is not None and any(MODES[m].load_in_4bit for m in plan.modes):
        report.checks.append(Check("4-bit LoRA runs", None, f"skipped: {no_4bit}"))
    runs = plan_runs(plan, families, can_4bit=no_4bit is None)
    with quiet_transformers():
        report.runs = train_all(runs, plan, device, models_dir, peak["flops_per_s"], budget)
        for run, result in zip(runs, report.runs, strict=True):
            report.checks += run_checks(result, run.mode.score_masked_only)
        report.checks += precision_checks(report.runs)
        report.fits = fit_memory(runs, report.runs)
        report.checks += [memory_check(*key.split("/", 1), fit) for key, fit in report.fits.items()]
        report.plan_rows = plan_table(report.fits, families, budget)
    report.seconds = time.perf_counter() - start
    return report


def train_all(
    runs: list[RunPlan],
    plan: Plan,
    device: torch.device,
    models_dir: Path,
    peak_flops: float,
    budget: float,
) -> list[RunResult]:
    """Every run in turn (one line of progress each on stderr); too big ones skipped."""
    results = []
    for i, run in enumerate(runs, 1):
        result = too_big(run, budget)
        if result is None:
            folder = build_model_folder(run.workload, run.size, models_dir, device)
            result = run_once(run, folder, plan, device, peak_flops)
        results.append(result)
        status = "ok" if result.error is None else f"FAILED: {result.error}"
        status = f"skipped: {result.skipped}" if result.skipped else status
        print(
            f"[{i}/{len(runs)}] {run.key}: {status} ({result.seconds:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    return results


@functools.cache
def run_static(family: str, size: str, mode: str) -> StaticMemory:
    """static_memory of a registry size (a meta-device build: cached, LoRA on 8B takes 2 s)."""
    workload = WORKLOADS[family]
    return static_memory(workload, workload.config(size), MODES[mode])


def too_big(run: RunPlan, budget: float) -> RunResult | None:
    """A skipped result when weights, gradients and AdamW states alone exceed the budget."""
    static = run_static(run.workload.family, run.size, run.mode.name)
    need = static.fixed + static.gradient_bytes
    if need <= budget:
        return None
    shape = run.workload.sizes[run.size]
    result = RunResult(
        run.key, run.workload.family, run.size, run.mode.name, shape.layers, shape.hidden
    )
    result.skipped = f"needs {need / 1e9:.1f} GB before activations; {budget / 1e9:.1f} GB here"
    return result


def precision_checks(results: list[RunResult]) -> list[Check]:
    """bf16 against fp32 on each family's small model (the fp32 run's partner)."""
    by_key = {r.key: r for r in results}
    checks = []
    for fp32 in (r for r in results if r.mode == "fp32 full"):
        bf16 = by_key.get(f"{fp32.family}/{fp32.size}/full")
        if bf16 is not None:
            checks.append(precision_check(bf16, fp32))
    return checks


def fit_memory(runs: list[RunPlan], results: list[RunResult]) -> dict[str, Fit | str]:
    """One fit per (family, mode) over the phases of its runs at every size."""
    points: dict[str, list[Point]] = defaultdict(list)
    for run, result in zip(runs, results, strict=True):
        if not run.mode.plan:
            continue
        key = f"{run.workload.family}/{run.mode.name}"
        points.setdefault(key, [])
        if result.error is not None or result.skipped is not None:
            continue
        static = run_static(run.workload.family, run.size, run.mode.name)
        for phase in result.phases:
            if phase.peak_bytes is not None:
                points[key].append(
                    Point(
                        result.key,
                        result.layers,
                        result.hidden,
                        phase.tokens,
                        static.fixed,
                        static.gradient_bytes,
                        float(phase.peak_bytes),
                    )  # fmt: skip
                )
    return {key: fit_points(*key.split("/", 1), pts) for key, pts in points.items()}


def plan_table(
    fits: dict[str, Fit | str], families: tuple[str, ...], budget: float
) -> list[PlanRow]:
    """For each family's released shape and each fitted mode: the largest batches."""
    rows = []
    for family in families:
        workload = WORKLOADS[family]
        if workload.plan_shape is None:
            continue
        config = workload.plan_config()
        for key, fit in fits.items():
            if not key.startswith(f"{family}/") or isinstance(fit, str):
                continue
            mode = MODES[fit.mode]
            static = static_memory(workload, config, mode)
            rows.append(
                PlanRow(
                    model=workload.plan_name or family,
                    mode=mode.name,
                    fixed_gb=static.fixed / 1e9,
                    gradient_gb=fit.coefs["g"] * static.gradient_bytes / 1e9,
                    activation_kb_per_token=fit.activation_per_token(workload.plan_shape) / 1e3,
                    largest_batch={
                        n: largest_batch(fit, static, workload.plan_shape, n, budget)
                        for n in plan_lengths(workload.plan_max_length)
                    },
                )
            )
    return rows


def launcher_report(
    device: str, families: tuple[str, ...], long: bool, root: Path
) -> tuple[list[LauncherRun], list[Check]]:
    """Two processes through the launcher against one; every strategy for the first
    family (all families with --long), DDP for the others."""
    strategies = strategies_available(device)
    runs: list[LauncherRun] = []
    with quiet_transformers():
        for i, family in enumerate(families):
            chosen = strategies if (long or i == 0) else ["ddp"]
            for run in launcher_checks([WORKLOADS[family]], device, chosen, root):
                status = "ok" if run.passed else f"FAILED: {run.error or run.rel_diff}"
                print(f"[launcher] {run.family}/{run.strategy}: {status}", file=sys.stderr)
                runs.append(run)
    checks = [launcher_check(run) for run in runs]
    if device == "cuda" and "deepspeed_zero3" not in strategies:
        checks.append(Check("DeepSpeed ZeRO-3", None, "skipped: deepspeed is not installed"))
    return runs, checks
