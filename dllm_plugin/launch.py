"""Single process or a re-launch under accelerate (multi-GPU, multi-CPU, multi-node, TPU).

The job decides here whether this process trains itself or supervises training
processes. For more than one process it writes one accelerate config file (into a
temporary folder, atomically), re-executes `main.py` under `accelerate launch` with the
same input file and a guard flag, streams the children's output into our log and
returns their exit status with the reason of the first rank that failed.

Why a generated config file rather than flags: `--config_file` also keeps a user's
`~/.cache/huggingface/accelerate/default_config.yaml` from silently changing the job,
and the file states the whole distributed set-up in one readable place.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from .config import PLUGIN_DIR, ConfigError, JobConfig
from .host import Host

logger = logging.getLogger(__name__)

MAIN_SCRIPT = PLUGIN_DIR / "main.py"
# A launched child writes its failure reason into this folder (one file per rank).
FAILURE_DIR_ENV = "DLLM_FAILURE_DIR"
STOPPED_MARKER = "stopped"  # written there by rank 0 after a clean stop on request
DIST_ENV_VARS = ("LOCAL_RANK", "WORLD_SIZE")
MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}
TPU_CORES_DEFAULT = 8  # accelerate's own default for a TPU host (display only: xmp decides)


@dataclass
class LaunchResult:
    """What the launched training processes did: their exit status and, on failure, why."""

    returncode: int
    reason: str = ""


@dataclass(frozen=True)
class LaunchPlan:
    """Where and how the job trains; everything the accelerate config is made from."""

    device: str  # cuda, cpu or tpu
    processes_per_machine: int
    num_machines: int
    machine_rank: int
    strategy: str  # ddp, fsdp, deepspeed_zero2, deepspeed_zero3
    mixed_precision: str  # accelerate's name: no, bf16, fp16
    gpu_ids: tuple[str, ...] | None = None  # the selected GPUs; None = all visible
    visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES for the training processes
    main_process_ip: str = ""
    main_process_port: int = 29500

    @property
    def num_processes(self) -> int:
        """All training processes on all machines (accelerate's `num_processes`)."""
        return self.processes_per_machine * self.num_machines

    @property
    def needs_launcher(self) -> bool:
        """More than one process, several machines, or a TPU (xmp spawns the cores)."""
        return self.device == "tpu" or self.num_processes > 1


# ---- decide ---------------------------------------------------------------------------
def maybe_relaunch(
    cfg: JobConfig, input_file: Path, args: argparse.Namespace
) -> LaunchResult | None:
    """None: train in this process. Otherwise the result of the launched processes."""
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
        config_path = write_atomic(Path(tmp) / "accelerate_config.yaml", config_text)
        failure_dir = Path(tmp) / "failures"
        failure_dir.mkdir()
        command = launch_command(plan, config_path, Path(input_file), args)
        print(describe_plan(plan, cfg, command, config_text), flush=True)
        returncode, tail = run_streaming(command, child_environment(plan, failure_dir))
        return launch_result(failure_dir, returncode, tail)


def already_launched(args: argparse.Namespace) -> bool:
    """True inside a launched child, or when torchrun/accelerate started this process."""
    return bool(getattr(args, "launched_with_accelerate", False)) or any(
        name in os.environ for name in DIST_ENV_VARS
    )


def plan_launch(cfg: JobConfig) -> LaunchPlan:
    """The plan for this machine; ConfigError for set-ups that cannot work."""
    device, strategy = cfg.train_device, cfg.distributed_strategy
    gpu_ids = None
    if device == "cuda":
        gpu_ids = parse_gpu_ids(cfg.gpu_ids)
        per_machine = cuda_device_count() if gpu_ids is None else len(gpu_ids)
        if cfg.num_processes != 1:
            logger.warning(
                "num_processes %s is ignored with train_device cuda: one process per selected GPU",
                cfg.num_processes,
            )
    elif device == "cpu":
        per_machine = cfg.num_processes
    else:  # tpu: torch_xla spawns one process per core
        per_machine = cfg.num_processes if cfg.num_processes > 1 else TPU_CORES_DEFAULT
    plan = LaunchPlan(
        device=device,
        processes_per_machine=per_machine,
        num_machines=cfg.num_machines,
        machine_rank=cfg.machine_rank,
        strategy=strategy,
        mixed_precision=MIXED_PRECISION[cfg.dtype],
        gpu_ids=gpu_ids,
        main_process_ip=str(cfg.main_process_ip or "").strip(),
        main_process_port=cfg.main_process_port,
    )
    if gpu_ids is not None:
        # Several GPUs: check them now (this process never uses CUDA itself). One GPU:
        # do not touch CUDA before CUDA_VISIBLE_DEVICES is set for this very process.
        visible = visible_devices(gpu_ids, check_count=plan.needs_launcher)
        plan = replace(plan, visible_devices=visible)
    check_plan(plan, cfg)
    return plan


def parse_gpu_ids(value: Any) -> tuple[str, ...] | None:
    """'auto' -> None (all visible GPUs); '0, 2' -> ('0', '2'). Duplicates are an error."""
    text = str(value).strip()
    if text in ("", "auto"):
        return None
    ids = tuple(part.strip() for part in text.split(","))
    if not all(part.isdigit() for part in ids):
        raise ConfigError([f"gpu_ids: {text!r} must be 'auto' or GPU indices such as '0,2'"])
    if len(set(ids)) != len(ids):
        raise ConfigError([f"gpu_ids: {text!r} lists a GPU twice"])
    return ids


def cuda_device_count() -> int:
    """GPUs this process sees (NVML-based: does not initialise CUDA here)."""
    import torch

    return torch.cuda.device_count()


def visible_devices(gpu_ids: tuple[str, ...], check_count: bool) -> str:
    """CUDA_VISIBLE_DEVICES for the chosen GPUs.

    gpu_ids index the GPUs this process sees, so under an existing CUDA_VISIBLE_DEVICES
    ('4,5,6,7') the ids '0,2' select '4,6'.
    """
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    seen = [d.strip() for d in inherited.split(",") if d.strip()] if inherited else None
    count = len(seen) if seen is not None else (cuda_device_count() if check_count else None)
    if count is not None:
        missing = [i for i in gpu_ids if int(i) >= count]
        if missing:
            raise ConfigError(
                [
                    f"gpu_ids: GPU {', '.join(missing)} does not exist: {count} GPU(s) are visible "
                    f"(indices 0-{count - 1})"
                    if count
                    else f"gpu_ids: {','.join(gpu_ids)} selects GPUs but none is visible"
                ]
            )
    return ",".join(seen[int(i)] for i in gpu_ids) if seen is not None else ",".join(gpu_ids)


def check_plan(plan: LaunchPlan, cfg: JobConfig) -> None:
    """Combinations that would fail late (or silently) inside the launched processes."""
    problems: list[str] = []
    distributed = plan.num_processes > 1
    if distributed and plan.strategy != "ddp":
        if plan.device != "cuda":
            problems.append(
                f"distributed_strategy: {plan.strategy!r} needs train_device 'cuda'; use 'ddp' on {plan.device}"
            )
        if plan.strategy.startswith("deepspeed") and not _deepspeed_installed():
            problems.append(
                f"distributed_strategy: {plan.strategy!r} needs DeepSpeed: pip install deepspeed (or use 'ddp' or 'fsdp')"
            )
        if cfg.load_in_4bit and plan.strategy in ("fsdp", "deepspeed_zero3"):
            problems.append(
                f"load_in_4bit: true does not work with distributed_strategy {plan.strategy!r}; use 'ddp' or 'deepspeed_zero2'"
            )
    if plan.device == "tpu" and plan.num_machines > 1:
        problems.append("num_machines: multi-node TPU pods are not supported; use num_machines 1")
    if problems:
        raise ConfigError(problems)


def _deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


# ---- the accelerate config and command -------------------------------------------------
def accelerate_config(plan: LaunchPlan, cfg: JobConfig) -> dict[str, Any]:
    """The accelerate config file for this launch (accelerate 1.x `ClusterConfig` keys)."""
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": _distributed_type(plan),
        "num_processes": plan.num_processes,  # all machines together
        "num_machines": plan.num_machines,
        "machine_rank": plan.machine_rank,
        "mixed_precision": plan.mixed_precision,
        "use_cpu": plan.device == "cpu",
        "gpu_ids": "all",  # the selection is made with CUDA_VISIBLE_DEVICES instead
        "rdzv_backend": "static",  # torchrun's static rendezvous at main_process_ip:port
        "main_training_function": "main",
        "downcast_bf16": False,
        "enable_cpu_affinity": False,
        "debug": False,
    }
    if plan.num_machines > 1:
        config["main_process_ip"] = plan.main_process_ip
        config["main_process_port"] = plan.main_process_port
    else:
        config["main_process_port"] = 0  # one machine: any free port (parallel jobs never clash)
    if plan.strategy == "fsdp" and config["distributed_type"] == "FSDP":
        config["fsdp_config"] = fsdp_config()
    if plan.strategy.startswith("deepspeed") and config["distributed_type"] == "DEEPSPEED":
        config["deepspeed_config"] = deepspeed_config(plan, cfg)
    return config


def _distributed_type(plan: LaunchPlan) -> str:
    if plan.device == "tpu":
        return "XLA"
    if plan.device == "cpu":
        return "MULTI_CPU"
    return {"fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}.get(
        plan.strategy, "MULTI_GPU"
    )


def fsdp_config() -> dict[str, Any]:
    """FSDP2, one shard unit per transformer block, full state dict for saving.

    Every rank loads the weights itself (no cpu_ram_efficient_loading): slower to start
    for large models, but it works the same for plain models, LoRA models and our native
    LLaDA/Dream classes. Gradient checkpointing stays the model's own (enabled at load
    time), so FSDP's activation checkpointing is off.
    """
    return {
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_reshard_after_forward": True,
        "fsdp_offload_params": False,
        "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_cpu_ram_efficient_loading": False,
        "fsdp_sync_module_states": True,
        "fsdp_activation_checkpointing": False,
    }


def deepspeed_config(plan: LaunchPlan, cfg: JobConfig) -> dict[str, Any]:
    """ZeRO-2 or ZeRO-3 without offload; the values the Trainer also uses, so they agree.

    Multi-node uses the 'standard' launcher (torchrun on each machine, as for ddp), not
    pdsh/ssh: the same job is started on every machine.
    """
    stage = 3 if plan.strategy == "deepspeed_zero3" else 2
    config: dict[str, Any] = {
        "zero_stage": stage,
        "offload_optimizer_device": "none",
        "offload_param_device": "none",
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        # training_args.py turns max_grad_norm 0 (no clipping) into 1e9: the same here.
        "gradient_clipping": float(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else 1e9,
        "deepspeed_multinode_launcher": "standard",
    }
    if stage == 3:
        config["zero3_init_flag"] = True
        config["zero3_save_16bit_model"] = True  # the saved model is a normal full model
    return config


def launch_command(
    plan: LaunchPlan, config_path: Path, input_file: Path, args: argparse.Namespace
) -> list[str]:
    """`python -m accelerate.commands.launch ... main.py --input_file F --launched_with_accelerate ...`."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_path),
    ]
    if plan.device == "cpu":
        # A MULTI_CPU config alone (like `--cpu --num_processes N`) silently runs ONE
        # process; `--multi_gpu` picks the torchrun launcher, which gives N gloo ranks.
        command.append("--multi_gpu")
    command += [
        str(MAIN_SCRIPT),
        "--input_file",
        str(Path(input_file).resolve()),
        "--launched_with_accelerate",
    ]
    for name in ("plugin_dir", "experiment_name", "job_id"):  # the harness's own arguments
        value = getattr(args, name, None)
        if value is not None:
            command += [f"--{name}", str(value)]
    return command


def child_environment(plan: LaunchPlan, failure_dir: Path) -> dict[str, str]:
    """Our environment (host variables such as _TFL_ORG_ID included) plus what children need."""
    env = dict(os.environ)
    env[FAILURE_DIR_ENV] = str(failure_dir)
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the job log as they are printed
    env["PYTHONPATH"] = python_path(env.get("PYTHONPATH", ""))
    if plan.visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = plan.visible_devices
    if plan.device == "cpu" and "OMP_NUM_THREADS" not in env:
        # torchrun would set 1; share this machine's cores between the ranks instead.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // plan.processes_per_machine))
    return env


def python_path(existing: str) -> str:
    """PYTHONPATH holding our sys.path entries that are not installed packages or stdlib.

    The host's harness puts its SDK folder (and the plugin folder) on sys.path; the
    launched children must import the same modules.
    """
    stdlib = {
        str(Path(p).resolve())
        for key in ("stdlib", "platstdlib")
        if (p := sysconfig.get_paths().get(key))
    }
    entries: list[str] = []
    for entry in [*sys.path, *existing.split(os.pathsep)]:
        if not entry or not os.path.isdir(entry):
            continue
        resolved = str(Path(entry).resolve())
        parts = Path(resolved).parts
        if "site-packages" in parts or "dist-packages" in parts:
            continue
        if any(resolved == s or resolved.startswith(s + os.sep) for s in stdlib):
            continue
        if resolved not in entries:
            entries.append(resolved)
    return os.pathsep.join(entries)


def write_atomic(path: Path, text: str) -> Path:
    """Write a file whole or not at all (temporary sibling, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---- the plan, for the log ------------------------------------------------------------
def describe_plan(
    plan: LaunchPlan, cfg: JobConfig, command: list[str] | None = None, config_text: str = ""
) -> str:
    """Processes, devices, strategy, global batch, steps and precision, before anything runs."""
    procs = "one per TPU core" if plan.device == "tpu" else str(plan.num_processes)
    if plan.num_machines > 1:
        procs += f" ({plan.processes_per_machine} per machine x {plan.num_machines} machines)"
    strategy = plan.strategy if plan.num_processes > 1 else f"{plan.strategy} (unused: 1 process)"
    lines = [
        "launch plan:" if command else "training plan (this process):",
        f"  processes     {procs}",
        f"  devices       {_describe_devices(plan)}",
        f"  strategy      {strategy}",
        f"  global batch  {_describe_batch(plan, cfg)}",
        f"  steps         {_describe_steps(cfg)}",
        f"  precision     {cfg.dtype} (accelerate mixed_precision {plan.mixed_precision})",
    ]
    if plan.num_machines > 1:
        lines.append(
            f"  machine       rank {plan.machine_rank} of {plan.num_machines}, "
            f"main process {plan.main_process_ip}:{plan.main_process_port}"
        )
    if command:
        lines.append(f"  command       {shlex.join(command)}")
    if config_text:
        lines.append("  accelerate config:")
        lines += [f"    {line}" for line in config_text.rstrip().splitlines()]
    return "\n".join(lines)


def _describe_devices(plan: LaunchPlan) -> str:
    if plan.device == "cpu":
        return "cpu (gloo)" if plan.num_processes > 1 else "cpu"
    if plan.device == "tpu":
        return "tpu (torch_xla)"
    if plan.gpu_ids is None:
        return f"cuda: all {plan.processes_per_machine} visible GPU(s)"
    return f"cuda: GPU {','.join(plan.gpu_ids)} (CUDA_VISIBLE_DEVICES={plan.visible_devices})"


def _describe_batch(plan: LaunchPlan, cfg: JobConfig) -> str:
    ga = cfg.gradient_accumulation_steps
    if plan.device == "tpu":
        return f"batch_size {cfg.batch_size} x TPU cores x gradient_accumulation_steps {ga}"
    total = cfg.batch_size * plan.num_processes * ga
    return (
        f"{total} = batch_size {cfg.batch_size} x {plan.num_processes} process(es) "
        f"x gradient_accumulation_steps {ga}"
    )


def _describe_steps(cfg: JobConfig) -> str:
    if cfg.num_train_epochs > 0:
        return f"{cfg.num_train_epochs} epoch(s)"
    return f"{cfg.train_steps} optimizer steps"


# ---- run and report -------------------------------------------------------------------
def run_streaming(command: list[str], env: dict[str, str], keep: int = 40) -> tuple[int, list[str]]:
    """Run the launcher, copy its output to our stdout line by line; (status, last lines).

    The first SIGTERM/SIGINT sent to us is passed on once (a second copy would cut short
    the launcher's own graceful shutdown): the training processes stop at the end of
    their step with a checkpoint and do not outlive a killed job. We read until every
    process holding the output pipe is gone, so we never return before the ranks do.
    """
    tail: collections.deque[str] = collections.deque(maxlen=keep)
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
    )
    with _forward_first_signal(proc):
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))
        returncode = proc.wait()
    return returncode, list(tail)


@contextlib.contextmanager
def _forward_first_signal(proc: subprocess.Popen) -> Iterator[None]:
    forwarded: list[int] = []

    def forward(sig: int, _frame: Any) -> None:
        if not forwarded and proc.poll() is None:
            forwarded.append(sig)
            logger.warning("passing %s on to the training processes", signal.Signals(sig).name)
            proc.send_signal(sig)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not the main thread: cannot install
            previous[sig] = signal.signal(sig, forward)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launch_result(failure_dir: Path, returncode: int, tail: list[str]) -> LaunchResult:
    """Success, a clean stop on request, or a failure with the best reason we have."""
    if returncode == 0:
        return LaunchResult(0)
    reason = rank_failure(failure_dir)
    if reason is None and (failure_dir / STOPPED_MARKER).is_file():
        # Rank 0 stopped on request with a checkpoint and told the host; the launcher
        # only reports the signal that asked for it.
        logger.info("training processes stopped on request (launcher status %s)", returncode)
        return LaunchResult(0)
    return LaunchResult(returncode, reason or fallback_reason(returncode, tail))


def rank_failure(failure_dir: Path) -> str | None:
    """'rank R: reason' for the first reason written (the lowest rank that wrote it), or None."""
    written = []
    for path in failure_dir.glob("rank-*.txt"):
        with contextlib.suppress(OSError, ValueError):
            rank = int(path.stem.split("-", 1)[1])
            written.append((path.stat().st_mtime_ns, rank, path.read_text(encoding="utf-8")))
    if not written:
        return None
    first = min(written)[2]
    rank = min(r for _, r, text in written if text == first)
    return f"rank {rank}: {first.strip() or 'unknown error'}"


def fallback_reason(returncode: int, tail: list[str]) -> str:
    """No rank wrote a reason (killed, crashed hard): the children's FAILED line or last line."""
    status = f"training processes exited with status {returncode}"
    for line in reversed(tail):
        if line.startswith("FAILED: "):
            return line[len("FAILED: ") :]
    meaningful = [line.strip() for line in tail if re.search(r"[A-Za-z0-9]", line)]
    return f"{status}: {meaningful[-1]}" if meaningful else status


def record_failure(reason: str) -> None:
    """In a launched child: leave this rank's failure reason for the launcher. Never raises."""
    _record(f"rank-{os.environ.get('RANK', '0')}.txt", reason)


def _record(name: str, text: str) -> None:
    folder = os.environ.get(FAILURE_DIR_ENV)
    if folder:
        with contextlib.suppress(OSError):
            write_atomic(Path(folder) / name, text)


# ---- only the main process talks to the host ------------------------------------------
class NonMainRankHost(Host):
    """What a rank other than 0 sees of the host: the dataset and the stop flag.

    Status, progress, metrics and model registration come from rank 0 only; a failure
    on any rank reaches the host through the launcher.
    """

    def __init__(self, host: Host):
        self._host = host
        self.name = host.name
        self.inside_host = host.inside_host

    def load_dataset(self, config: Any) -> Any | None:
        return self._host.load_dataset(config)

    def should_stop(self) -> bool:
        return self._host.should_stop()

    def models_dir(self) -> Path | None:
        return self._host.models_dir()


class LaunchedMainHost:
    """Rank 0 of a launched job: the host itself, plus a note to the launcher on a clean
    stop, so that the launcher's non-zero status after a forwarded signal is not a failure."""

    def __init__(self, host: Host):
        self._host = host

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)

    def stopped(self, summary: dict[str, Any]) -> None:
        _record(STOPPED_MARKER, str(summary.get("global_step", "")))
        self._host.stopped(summary)


def host_for_this_process(host: Host) -> Host:
    """Rank 0 (or no launcher): the host. Other ranks: a view that never updates it."""
    if os.environ.get("RANK", "0") != "0":
        return NonMainRankHost(host)
    return LaunchedMainHost(host) if os.environ.get(FAILURE_DIR_ENV) else host  # type: ignore[return-value]
