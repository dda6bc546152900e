"""The launch plan: how many processes on which devices, and the accelerate config.

Pure decisions from the job config and what this machine has; nothing is started
here (supervise.py runs the processes).

Why a generated config file rather than flags: `--config_file` also keeps a user's
`~/.cache/huggingface/accelerate/default_config.yaml` from silently changing the job,
and the file states the whole distributed set-up in one readable place.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
from dataclasses import dataclass, replace
from typing import Any

from ..config import JobConfig, gradient_clip_norm, parse_gpu_ids
from ..errors import ConfigError

logger = logging.getLogger(__name__)

MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}
TPU_CORES_DEFAULT = 8  # accelerate's own default for a TPU host (display only: xmp decides)


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
        "gradient_clipping": gradient_clip_norm(cfg),
        "deepspeed_multinode_launcher": "standard",
    }
    if stage == 3:
        config["zero3_init_flag"] = True
        config["zero3_save_16bit_model"] = True  # the saved model is a normal full model
    return config


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
