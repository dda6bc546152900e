"""Single process or a re-launch under accelerate (multi-GPU, multi-CPU, multi-node, TPU).

The job decides here whether this process trains itself or supervises training
processes (plan.py makes the plan and the accelerate config; supervise.py runs the
processes and reads how they ended). For more than one process it writes one
accelerate config file into a temporary folder, re-executes `main.py` under
`accelerate launch` with the same input file (or, when the host held the config, the
validated config written there) and a guard flag, and returns the children's exit
status with the reason of the first rank that failed. For a host that only the
launcher may talk to (a Transformer Lab task), rank 0's reports come back through a
channel (hosts/channel.py) and are made on that host while the processes run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import yaml

from ..atomic import write_json, write_text
from ..config import JobConfig
from ..hosts import EventReader, Host, MainRankHost, NonMainRankHost, channel_environment
from .plan import LaunchPlan, accelerate_config, describe_plan, plan_launch
from .supervise import (
    LaunchResult,
    Streamed,
    child_environment,
    launch_command,
    launch_result,
    launched_by_us,
    record_failure,
    record_stopped,
    run_streaming,
)

__all__ = [
    "LaunchPlan",
    "LaunchResult",
    "Streamed",
    "host_for_this_process",
    "maybe_relaunch",
    "owns_output_dir",
    "plan_launch",
    "record_failure",
]

DIST_ENV_VARS = ("LOCAL_RANK", "WORLD_SIZE")


def maybe_relaunch(
    cfg: JobConfig,
    input_file: Path | None,
    args: argparse.Namespace,
    host: Host | None = None,
) -> LaunchResult | None:
    """None: train in this process. Otherwise the result of the launched processes.

    `input_file` None: the host held the config; the children read `cfg` from a file.
    """
    if already_launched(args):
        return None
    plan = plan_launch(cfg)
    if not plan.needs_launcher:
        if plan.visible_devices is not None:  # one chosen GPU: only it is visible to us
            os.environ["CUDA_VISIBLE_DEVICES"] = plan.visible_devices
        print(describe_plan(plan, cfg), flush=True)
        return None
    with tempfile.TemporaryDirectory(prefix="dllm-launch-") as tmp:
        config_text = yaml.safe_dump(accelerate_config(plan, cfg), sort_keys=False)
        config_path = write_text(Path(tmp) / "accelerate_config.yaml", config_text)
        failure_dir = Path(tmp) / "failures"
        failure_dir.mkdir()
        if input_file is None:
            input_file = write_json(Path(tmp) / "job.json", {"config": cfg.to_dict()})
        env = child_environment(plan, failure_dir)
        reader = None
        if host is not None and host.reports_from_launcher:
            reader = EventReader(Path(tmp) / "host_events.jsonl")
            env.update(channel_environment(reader.events, host))
        command = launch_command(plan, config_path, Path(input_file), args)
        print(describe_plan(plan, cfg, command, config_text), flush=True)
        on_tick = (lambda: reader.replay(host)) if reader is not None else None
        result = launch_result(failure_dir, run_streaming(command, env, on_tick=on_tick))
        if reader is not None:
            result.final = reader.final
        return result


def already_launched(args: argparse.Namespace) -> bool:
    """True inside a launched child, or when torchrun/accelerate started this process."""
    return bool(getattr(args, "launched_with_accelerate", False)) or any(
        name in os.environ for name in DIST_ENV_VARS
    )


def owns_output_dir(cfg: JobConfig, args: argparse.Namespace) -> bool:
    """Whether this process claims output_dir (lock, run summary): the single training
    process or our launcher on machine 0, or rank 0 when another launcher started us;
    never a process our launcher started (its launcher holds the claim)."""
    if launched_by_us() or os.environ.get("RANK", "0") != "0":
        return False
    return already_launched(args) or cfg.machine_rank == 0


def host_for_this_process(host: Host) -> Host:
    """Rank 0 (or no launcher): the host. Other ranks: a view that never updates it."""
    if os.environ.get("RANK", "0") != "0":
        return NonMainRankHost(host)
    return MainRankHost(host, record_stopped) if launched_by_us() else host
