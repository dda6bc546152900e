"""Command-line entry: `python main.py --input_file job.json` (or no file: the demo).

Exit status 0 only for a finished (or cleanly stopped) run; any failure tells the host,
prints its reason as the last line, and exits 1. This is the one place that reports
errors: a `UserError` (config, data, template, model, missing package or file) is that
one line; anything else also prints its traceback first.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from . import signals
from .config import build_job_config, read_input_file
from .errors import UserError, one_line
from .jobdir import JobFolder, lock_output_dir

if TYPE_CHECKING:
    from .hosts import Host
    from .launch import LaunchResult

logger = logging.getLogger("dllm_plugin")
DEMO_JOB = Path(__file__).resolve().parent / "demo" / "job.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dllm-train", description=__doc__)
    parser.add_argument(
        "--input_file", help="host job file or flat config JSON (default: the embedded demo)"
    )
    parser.add_argument("--plugin_dir", help="set by the Transformer Lab harness")
    parser.add_argument("--experiment_name", help="set by the Transformer Lab harness")
    parser.add_argument("--job_id", help="set by the Transformer Lab harness")
    parser.add_argument("--launched_with_accelerate", action="store_true", help=argparse.SUPPRESS)
    args, _unknown = parser.parse_known_args(argv)
    return args


def setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    level = logging.INFO if rank == "0" else logging.WARNING
    fmt = (
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
        if rank == "0"
        else f"[rank {rank}] %(levelname)s: %(message)s"
    )
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub", "lab"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run one job; the exit status to return to the shell or the host."""
    with signals.handling(_interrupt, (signal.SIGTERM,)):
        return run_cli(argv)


def _interrupt(signum: int, _frame: object) -> None:
    """Outside training, SIGTERM ends the job like Ctrl-C instead of killing the process
    silently (the plugin host would then show the killed job as COMPLETE): a failure, or
    a stop for a host whose Stop is a signal (a task). During training StopSignals turns
    it into a stop at the end of the step instead."""
    raise KeyboardInterrupt(signals.name(signum))


def run_cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    from .hosts import detect_host, forward_logs
    from .launch import host_for_this_process

    host = host_for_this_process(detect_host())  # ranks other than 0 never update the host
    with forward_logs(host):
        code = _run(args, host)
    if host.stop_grace_s is not None and signals.first_stop_at() is not None:
        # Stopped against the host's clock: everything is written; the interpreter's own
        # shutdown (seconds, with torch loaded) would outlast it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(args: argparse.Namespace, host: Host) -> int:
    folder: JobFolder | None = None
    try:
        raw, experiment, source_dir, input_file = _job_input(args, host)
        cfg = build_job_config(raw, experiment, source_dir=source_dir)
        from .launch import maybe_relaunch, owns_output_dir
        from .run import check_job, run_job

        check_job(cfg, host)  # nothing is written before this passes
        if owns_output_dir(cfg, args):
            folder = lock_output_dir(Path(cfg.output_dir))
            folder.running(cfg.to_dict())
        launched = maybe_relaunch(cfg, input_file, args, host)
        if launched is not None:  # this process only supervised the training processes
            return _launched(host, launched, folder)
        host.running()
        return _finished(host, run_job(cfg, host))
    except UserError as e:  # the user can fix it: one line, no traceback
        return _failed(host, str(e), folder)
    except KeyboardInterrupt as e:
        signal_name = str(e) or "KeyboardInterrupt"
        if host.stop_grace_s is not None:  # the host's Stop, not a failure
            return _stopped_early(host, signal_name, folder)
        return _failed(host, f"interrupted ({signal_name}) before the job finished", folder)
    except Exception as e:  # a bug or the environment: keep the traceback for the log
        traceback.print_exc()
        return _failed(host, f"{type(e).__name__}: {e}", folder)
    finally:
        if folder is not None:
            folder.release()


def _job_input(args: argparse.Namespace, host: Host) -> tuple[dict, dict | None, Path, Path | None]:
    """(raw config, experiment, folder for relative paths, job file): from the host when it
    holds the config (a task), else from --input_file (none: the embedded demo)."""
    raw = host.raw_config()
    if raw is not None:
        return raw, None, Path.cwd(), None
    input_file = Path(args.input_file) if args.input_file else DEMO_JOB
    if not args.input_file:
        logger.info("no --input_file: running the embedded demo (%s)", DEMO_JOB)
    raw, experiment = read_input_file(input_file)
    if args.job_id and "job_id" not in raw:
        raw = {**raw, "job_id": args.job_id}
    return raw, experiment, input_file.resolve().parent, input_file


def _finished(host: Host, summary: dict) -> int:
    """A run that trained in this process: complete, or stopped on request."""
    if summary["status"] == "stopped":
        host.stopped(summary)
        how = (
            "resume with resume_from_checkpoint=auto"
            if host.stop_grace_s is None
            else "resume from the newest registered checkpoint"
        )
        logger.info("stopped at step %s; %s", summary["global_step"], how)
        return 0
    host.complete(summary)
    if os.environ.get("RANK", "0") == "0":  # other ranks saved nothing to report
        _print_final(summary)
    return 0


def _launched(host: Host, launched: LaunchResult, folder: JobFolder | None) -> int:
    """The launched processes' end. Rank 0 told the host itself, unless the host takes
    reports from the launcher only: then its final report is made here."""
    if launched.returncode != 0:
        return _failed(host, launched.reason, folder)
    if not host.reports_from_launcher:
        return 0
    if launched.final is not None:
        call, summary = launched.final
        getattr(host, call)(summary)  # complete or stopped
        return 0
    if launched.stopped:
        return _stopped_early(host, "stop request", folder)
    return _failed(host, "the training processes ended without reporting a result", folder)


def _stopped_early(host: Host, why: str, folder: JobFolder | None) -> int:
    """Stopped on request before training wrote its own summary: exit status 0 (the
    resumable state is the newest checkpoint, if any)."""
    logger.warning("stopped on request (%s) before the run finished", why)
    if folder is not None:
        folder.stopped(f"stopped on request ({why})")
    host.stopped({})
    return 0


def _failed(host: Host, reason: str, folder: JobFolder | None) -> int:
    """Tell the launcher (in a launched child), the output folder's run summary and the
    host; the reason is the last line of stdout and of stderr."""
    from .launch import record_failure

    line = f"FAILED: {one_line(reason)}"
    record_failure(reason)
    try:
        if folder is not None:
            folder.failed(one_line(reason))
        host.fail(reason)
    finally:
        sys.stdout.flush()
        print(line, flush=True)
        print(line, file=sys.stderr, flush=True)
    return 1


def _print_final(summary: dict) -> None:
    metrics = {k: v for k, v in summary["metrics"].items() if isinstance(v, int | float)}
    width = max((len(k) for k in metrics), default=10)
    print("\nfinal metrics", flush=True)
    for key, value in sorted(metrics.items()):
        print(
            f"  {key:<{width}}  {value:.6g}"
            if isinstance(value, float)
            else f"  {key:<{width}}  {value}"
        )
    for key in ("output_path", "merged_model_path", "loss_plot"):
        if summary.get(key):
            print(f"{key.replace('_', ' ')}: {summary[key]}", flush=True)
    print(
        f"done: {summary['global_step']} steps, model saved to {summary.get('output_path')}",
        flush=True,
    )
