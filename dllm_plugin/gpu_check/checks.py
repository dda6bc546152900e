"""The pass/fail checks, each from measured results (pure functions, no torch runs).

- every run trains: no error, every logged loss and NLL finite, and the NLL per masked
  token of the last timed step below the first (the same batch repeated: a model that
  learns must fit it better);
- every run asked for `score_masked_only` really scored only masked rows;
- bf16 against fp32 on the small model: same checkpoint, same noise (keyed by step and
  row), so step 1 differs only by precision (`BF16_LOSS_RTOL`, `BF16_GRAD_RTOL`);
- the memory model reproduces every measured peak within `memory_model.MAX_ERROR`;
- several processes through the launcher: step-1 loss as one process with accumulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .data_parallel import LauncherRun
from .memory_model import MAX_ERROR, Fit
from .runner import RunResult, phase_steps

__all__ = [
    "BF16_GRAD_RTOL",
    "BF16_LOSS_RTOL",
    "Check",
    "launcher_check",
    "memory_check",
    "precision_check",
    "run_checks",
]

# Why these tolerances: bf16 rounds every value to 8 significant bits (relative error up
# to 2^-9 = 0.2%). The step-1 loss is a mean over hundreds of masked positions of an
# fp32 cross-entropy, so independent roundings mostly cancel: measured differences are
# about 1e-5 (CPU, small models). The gradient norm sums squares of bf16 products and
# moves more (about 1e-3). 1% and 5% leave room for other kernels while catching what
# breaks mixed precision: a loss scaled twice, logits left in bf16 through the softmax
# of a 150k vocabulary, an overflow, a dtype mismatch that changes the math.
BF16_LOSS_RTOL = 1e-2
BF16_GRAD_RTOL = 5e-2


@dataclass
class Check:
    """One check: passed True/False, or None when it could not run here (skipped)."""

    name: str
    passed: bool | None
    detail: str


def run_checks(result: RunResult, masked_only: bool) -> list[Check]:
    """Trains (finite, falling) and, where asked, the masked head engaged."""
    name = result.key
    if result.skipped is not None:
        return [Check(f"{name}: trains", None, f"skipped: {result.skipped}")]
    if result.error is not None:
        return [Check(f"{name}: trains", False, result.error)]
    values = result.losses + result.nlls
    if not result.nlls or not all(math.isfinite(v) for v in values):
        return [Check(f"{name}: trains", False, f"non-finite loss or NLL: {values}")]
    timed = [result.nlls[i] for i in phase_steps(result)[0] if i < len(result.nlls)]
    before, after = result.fixed_nll if result.fixed_nll else (timed[0], timed[-1])
    checks = [
        Check(
            f"{name}: loss finite and falling",
            math.isfinite(after) and after < before,
            f"NLL per masked token on the first batch, fixed noise: {before:.4f} -> {after:.4f} "
            f"after {len(timed)} steps",
        )
    ]
    if masked_only:
        checks.append(
            Check(
                f"{name}: masked head used",
                result.head_fallback is None,
                result.head_fallback or "the head ran on masked rows only",
            )
        )
    return checks


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def precision_check(bf16: RunResult, fp32: RunResult) -> Check:
    """Step 1 of the bf16 run against the fp32 run: loss and gradient norm."""
    name = f"{bf16.family}/{bf16.size}: bf16 vs fp32 step 1"
    if bf16.skipped or fp32.skipped:
        return Check(name, None, f"skipped: {bf16.skipped or fp32.skipped}")
    if bf16.error or fp32.error or not bf16.losses or not fp32.losses:
        return Check(name, False, "a run failed: " + (bf16.error or fp32.error or "no loss"))
    loss = relative(bf16.losses[0], fp32.losses[0])
    grad = relative(bf16.grad_norms[0], fp32.grad_norms[0])
    ok = loss <= BF16_LOSS_RTOL and grad <= BF16_GRAD_RTOL
    detail = (
        f"loss {bf16.losses[0]:.5f} vs {fp32.losses[0]:.5f} (rel {loss:.1e} <= {BF16_LOSS_RTOL:g}), "
        f"grad norm {bf16.grad_norms[0]:.4f} vs {fp32.grad_norms[0]:.4f} "
        f"(rel {grad:.1e} <= {BF16_GRAD_RTOL:g})"
    )
    return Check(name, ok, detail)


def memory_check(family: str, mode: str, fit: Fit | str) -> Check:
    name = f"{family}/{mode}: memory model within {MAX_ERROR:.0%}"
    if isinstance(fit, str):  # runs failed (reported by their own checks) or were skipped
        return Check(name, None, f"skipped, not fitted: {fit}")
    worst = max(zip(fit.errors(), fit.points, strict=True), key=lambda e: abs(e[0]))
    return Check(
        name,
        fit.max_error <= MAX_ERROR,
        f"worst {worst[0]:+.1%} ({worst[1].run}, {worst[1].tokens} tokens) over "
        f"{len(fit.points)} measured peaks",
    )


def launcher_check(run: LauncherRun) -> Check:
    name = f"{run.family}: {run.strategy} on {run.processes} processes"
    if run.strategy == "reference":
        name = f"{run.family}: 1 process, gradient accumulation 2 (reference)"
    if run.error:
        return Check(name, False, run.error)
    if run.rel_diff is None:
        return Check(name, run.passed, f"losses {_fmt(run.losses)}")
    return Check(
        name,
        run.passed,
        f"step-1 loss {run.losses[0]:.5f} vs {run.reference_loss:.5f} "
        f"(rel {run.rel_diff:.1e} <= {run.tolerance:g}); losses {_fmt(run.losses)}",
    )


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"
