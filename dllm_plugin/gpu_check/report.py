"""The results as text tables (stdout) and as one JSON document."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .checks import Check
from .data_parallel import LauncherRun
from .memory_model import MAX_ERROR, Fit
from .suite import BUDGET_SHARE, DeviceReport

__all__ = ["failed", "fmt_bytes", "fmt_count", "render", "to_json", "write_json"]

TINY_NOTE = "\n(fitted on tiny models: these numbers only exercise the code, do not plan with them)"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}" if unit == "B" else f"{n / size:.1f}{unit}"
    return str(int(n))


def table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Columns padded to their widest cell; numeric columns (`right`) right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def runs_table(report: DeviceReport) -> str:
    rows = []
    for r in report.runs:
        if r.error is not None or r.skipped is not None:
            why = f"FAILED: {r.error}" if r.error is not None else f"skipped: {r.skipped}"
            rows.append([r.family, r.size, r.mode, *["-"] * 6, why])
            continue
        nll = f"{r.fixed_nll[0]:.3f} -> {r.fixed_nll[1]:.3f}" if r.fixed_nll else "-"
        rows.append(
            [
                r.family,
                r.size,
                r.mode,
                fmt_count(r.total_params),
                fmt_count(r.trainable_params),
                f"{1e3 * r.step_s:.1f}" if r.step_s else "-",
                f"{r.tokens_per_s:,.0f}" if r.tokens_per_s else "-",
                f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-",
                fmt_bytes(r.peak_bytes),
                nll,
            ]  # fmt: skip
        )
    header = ["family", "size", "mode", "params", "trained", "step ms", "tokens/s", "MFU"]
    header += ["peak mem", "NLL before -> after"]
    return table(header, rows, right={3, 4, 5, 6, 7, 8})


def fits_table(fits: dict[str, Fit | str]) -> str:
    rows = []
    for key, fit in fits.items():
        if isinstance(fit, str):
            rows.append([key, "-", "-", "-", "-", f"not fitted: {fit}"])
            continue
        c = fit.coefs
        rows.append(
            [
                key,
                f"{c['g']:.2f}",
                f"{c['a']:.1f}",
                fmt_bytes(c["c"]),
                fmt_bytes(c["e"]),
                f"{100 * fit.max_error:.1f}%",
            ]  # fmt: skip
        )
    header = ["family/mode", "g", "a B/tok/(layer*hidden)", "c per token", "e", "max error"]
    return table(header, rows, right={1, 2, 3, 4, 5})


def plan_table(report: DeviceReport) -> str:
    lengths = sorted({n for row in report.plan_rows for n in row.largest_batch})

    def cell(batches: dict[int, int], n: int) -> str:
        if n not in batches:
            return ""  # longer than the model's positions
        return str(batches[n]) if batches[n] else "-"

    rows = [
        [row.model, row.mode, f"{row.fixed_gb + row.gradient_gb:.1f}",
         f"{row.activation_kb_per_token:.0f}", *[cell(row.largest_batch, n) for n in lengths]]
        for row in report.plan_rows
    ]  # fmt: skip
    header = ["model", "mode", "static GB", "kB/token", *[f"l={n}" for n in lengths]]
    return table(header, rows, right=set(range(2, 4 + len(lengths))))


def checks_table(checks: list[Check]) -> str:
    mark = {True: "PASS", False: "FAIL", None: "SKIP"}
    return table(["", "check", "detail"], [[mark[c.passed], c.name, c.detail] for c in checks])


def render(
    reports: list[DeviceReport], launcher_runs: list[LauncherRun], launcher_checks: list[Check]
) -> str:
    parts = []
    for report in reports:
        env = ", ".join(f"{k} {v}" for k, v in report.environment.items())
        parts += [
            f"== {report.device} ({report.name}), plan {report.plan}, {report.seconds:.0f} s",
            env,
            f"bf16 matmul peak {report.matmul_peak['flops_per_s'] / 1e12:.2f} TFLOP/s "
            f"({report.matmul_peak['size']}^2 GEMMs); memory {fmt_bytes(report.memory_total)}, "
            f"planning budget {fmt_bytes(report.budget)} ({BUDGET_SHARE:.0%} of what was free)",
            "",
            "Training runs (step ms, tokens/s, MFU: median of the timed steps after the first;"
            " peak: allocated, above the start)",
            runs_table(report),
            "",
            f"Memory model per family/mode (fitted on the runs; must be within {MAX_ERROR:.0%})",
            fits_table(report.fits),
            "",
            f"Largest batch_size per max_length that fits {fmt_bytes(report.budget)}"
            " (predicted; '-' = does not fit)" + TINY_NOTE * (report.plan == "tiny"),
            plan_table(report),
            "",
            "Checks",
            checks_table(report.checks),
            "",
        ]
    if launcher_checks:
        parts += ["Several processes through the launcher", checks_table(launcher_checks), ""]
    all_checks = [c for r in reports for c in r.checks] + launcher_checks
    counts = {v: sum(c.passed is v for c in all_checks) for v in (True, False, None)}
    parts.append(
        f"{len(all_checks)} checks: {counts[True]} passed, {counts[False]} failed, "
        f"{counts[None]} skipped"
    )
    return "\n".join(parts)


def failed(reports: list[DeviceReport], launcher_checks: list[Check]) -> bool:
    return any(c.passed is False for r in reports for c in r.checks) or any(
        c.passed is False for c in launcher_checks
    )


def _report_json(report: DeviceReport) -> dict[str, Any]:
    data = dataclasses.asdict(report)
    for run, out in zip(report.runs, data["runs"], strict=True):
        out["peak_bytes"] = run.peak_bytes
    for key, fit in report.fits.items():
        if not isinstance(fit, str):
            data["fits"][key]["errors"] = fit.errors()
            data["fits"][key]["max_error"] = fit.max_error
    return data


def to_json(
    reports: list[DeviceReport], launcher_runs: list[LauncherRun], launcher_checks: list[Check]
) -> dict[str, Any]:
    return {
        "passed": not failed(reports, launcher_checks),
        "devices": [_report_json(r) for r in reports],
        "launcher": {
            "runs": [dataclasses.asdict(r) for r in launcher_runs],
            "checks": [dataclasses.asdict(c) for c in launcher_checks],
        },
    }


def write_json(data: dict[str, Any], path: Path) -> None:
    from ..atomic import write_json as atomic_write_json

    atomic_write_json(path, data)
