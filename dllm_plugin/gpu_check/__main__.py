"""`python -m dllm_plugin.gpu_check`: arguments, devices, exit status.

Exit status: 0 when every check passed (or was skipped), and when there is no CUDA
device to check; 1 when a check failed; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .checks import Check
from .report import failed, render, to_json, write_json
from .suite import DeviceReport, launcher_report, run_device
from .workloads import PLANS, WORKLOADS, Plan

NO_CUDA = (
    "gpu_check: no CUDA device is visible, nothing to check "
    "(--device cpu --tiny runs the same code on tiny models)"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dllm_plugin.gpu_check",
        description="Train every family for a few steps on this machine's GPUs; check that "
        "the loss falls, bf16 agrees with fp32, the memory model fits, several processes "
        "agree with one; print speed, memory and what fits.",
    )
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--tiny", action="store_true", help="tiny models (hidden 32-64, vocab 512)")
    parser.add_argument("--long", action="store_true", help="more modes, steps and lengths")
    parser.add_argument(
        "--families", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS),
        help="families to run (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--launcher", choices=["auto", "off", "cpu"], default="auto",
        help="several-process checks: auto = with 2+ GPUs; cpu = two gloo processes (slow)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"), help="JSON output")
    parser.add_argument("--models-dir", type=Path, help="keep/reuse the generated model folders")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads with --device cpu (0: default)"
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # one GPU of several
    parser.add_argument("--label", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu needs --tiny (the default plan trains 1B-parameter models)")
    if args.tiny and args.long:
        parser.error("--tiny and --long exclude each other")
    return args


def chosen_plan(args: argparse.Namespace) -> Plan:
    return PLANS["tiny" if args.tiny else "long" if args.long else "default"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    plan, families = chosen_plan(args), tuple(args.families)
    threads = torch.get_num_threads()
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)  # tiny models: more threads only wait on each other
    gc.freeze()  # the collections between runs then skip everything imported so far
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            models_dir = args.models_dir or Path(tmp) / "models"
            if args.worker is not None:
                report = one_device(plan, families, models_dir, args.label)
                args.worker.write_bytes(pickle.dumps(report))
                return 0
            reports = all_devices(args, plan, families, models_dir, Path(tmp))
            runs, launcher = launchers(args, families, Path(tmp) / "launcher", len(reports))
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)
    print(render(reports, runs, launcher))
    write_json(to_json(reports, runs, launcher), args.json)
    print(f"wrote {args.json}")
    return 1 if failed(reports, launcher) else 0


def one_device(
    plan: Plan, families: tuple[str, ...], models_dir: Path, label: str | None
) -> DeviceReport:
    report = run_device(plan, torch.device("cuda"), families, models_dir)
    if label:
        report.device = label
    return report


def all_devices(
    args: argparse.Namespace, plan: Plan, families: tuple[str, ...], models_dir: Path, tmp: Path
) -> list[DeviceReport]:
    """This process checks the one device; with several GPUs, one worker process each."""
    if args.device == "cpu":
        return [run_device(plan, torch.device("cpu"), families, models_dir)]
    count = torch.cuda.device_count()
    if count == 1:
        return [run_device(plan, torch.device("cuda"), families, models_dir)]
    from .runner import build_model_folder

    for family in families:  # built once, before the workers share them
        for size in plan.sizes:
            build_model_folder(WORKLOADS[family], size, models_dir)
    return run_workers(args, families, models_dir, tmp, count)


def visible_ids(count: int) -> list[str]:
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if inherited:
        return [d.strip() for d in inherited.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


def run_workers(
    args: argparse.Namespace, families: tuple[str, ...], models_dir: Path, tmp: Path, count: int
) -> list[DeviceReport]:
    """Every GPU at once, each in its own process that sees only that GPU."""
    workers = []
    for i, physical in enumerate(visible_ids(count)):
        out, log = tmp / f"device{i}.pkl", tmp / f"device{i}.log"
        cmd = [sys.executable, "-m", "dllm_plugin.gpu_check", "--device", "cuda"]
        cmd += ["--families", *families, "--models-dir", str(models_dir)]
        cmd += ["--worker", str(out), "--label", f"cuda:{i}"]
        cmd += ["--long"] if args.long else ["--tiny"] if args.tiny else []
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=physical)
        with open(log, "w", encoding="utf-8") as f:
            workers.append((i, subprocess.Popen(cmd, env=env, stdout=f, stderr=f), out, log))
    reports = []
    for i, proc, out, log in workers:
        proc.wait()
        if proc.returncode == 0 and out.is_file():
            reports.append(pickle.loads(out.read_bytes()))
            continue
        lines = [ln for ln in log.read_text(encoding="utf-8").splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        report = DeviceReport(f"cuda:{i}", "?", "-", 0.0, 0.0, {"flops_per_s": 0, "size": 0}, {})
        report.checks.append(Check(f"cuda:{i}: checks ran", False, reason))
        reports.append(report)
    return reports


def launchers(
    args: argparse.Namespace, families: tuple[str, ...], root: Path, devices: int
) -> tuple[list, list[Check]]:
    if args.launcher == "off":
        return [], []
    if args.launcher == "cpu":
        return launcher_report("cpu", families, args.long, root)
    if args.device == "cpu":
        return [], []
    if devices < 2:
        return [], [Check("several GPUs through the launcher", None, "skipped: one GPU visible")]
    return launcher_report("cuda", families, args.long, root)


if __name__ == "__main__":
    sys.exit(main())
