"""JobConfig -> the method's TrainingArguments, and checkpoint resume."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from .checkpoints import TRAINER_STATE, latest_checkpoint
from .config import JobConfig, gradient_clip_norm
from .methods import Method
from .trackers import set_job_env, usable_trackers

logger = logging.getLogger(__name__)


def training_arguments(
    cfg: JobConfig, method: Method, has_eval: bool, inside_host: bool
) -> TrainingArguments:
    """The Trainer's arguments; every value traces back to a manifest parameter."""
    output_dir = Path(cfg.output_dir)
    use_tensorboard_dir(cfg)
    eval_strategy = cfg.eval_strategy if has_eval else "no"
    if cfg.eval_strategy != "no" and not has_eval:
        logger.warning(
            "eval_strategy %r but there is no evaluation split: evaluation is off",
            cfg.eval_strategy,
        )
    common = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.learning_rate_schedule,
        warmup_steps=float(cfg.warmup_ratio),
        num_train_epochs=float(cfg.num_train_epochs) if cfg.num_train_epochs > 0 else 1.0,
        max_steps=-1 if cfg.num_train_epochs > 0 else cfg.train_steps,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        gradient_checkpointing=False,  # enabled at load time (works with peft/4-bit too)
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        weight_decay=cfg.weight_decay,
        max_grad_norm=gradient_clip_norm(cfg),
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=cfg.eval_steps if eval_strategy == "steps" else None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.dtype == "bfloat16",
        fp16=cfg.dtype == "float16",
        use_cpu=cfg.train_device == "cpu",
        report_to=report_to(cfg),
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        disable_tqdm=inside_host,
    )
    arguments = method.trainer_class().arguments_class
    return arguments(**common, **method_options(cfg, method, arguments))


def method_options(cfg: JobConfig, method: Method, arguments: type) -> dict[str, Any]:
    """The method's own options: the fields its arguments class adds to TrainingArguments,
    from the manifest parameters of the same name (the weighting from the method's own
    parameter: `mdlm_loss_weight_type` or `loss_weight_type`)."""
    own = set(arguments.__dataclass_fields__) - set(TrainingArguments.__dataclass_fields__)
    options = {name: cfg.params[name] for name in own if name in cfg.params}
    if method.weight_option is not None:
        options["loss_weight_type"] = cfg.params[method.weight_option]
    return options


def use_tensorboard_dir(cfg: JobConfig) -> None:
    """Point the Trainer's TensorBoard writer (transformers 5 reads the folder from the
    environment) at this job's folder under output_dir."""
    set_job_env("TENSORBOARD_LOGGING_DIR", str(tensorboard_dir(cfg)))


def tensorboard_dir(cfg: JobConfig) -> Path:
    """A fresh TensorBoard run folder under output_dir (one per job)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"job_{cfg.job_id}_{stamp}" if cfg.job_id is not None else f"run_{stamp}"
    return Path(cfg.output_dir) / "tensorboard" / name


def report_to(cfg: JobConfig) -> list[str]:
    """TensorBoard always (when installed); W&B only when asked and usable."""
    return usable_trackers(cfg.log_to_wandb, Path(cfg.output_dir))


def resolve_resume(value: str, output_dir: Path) -> str | None:
    """'off' -> None; 'auto' -> newest complete checkpoint in output_dir (or None); else the
    path (a folder of checkpoints stands for its newest complete one)."""
    value = (value or "off").strip()
    if value in ("off", ""):
        return None
    if value != "auto":
        path = Path(value).expanduser()
        if not (path / TRAINER_STATE).is_file() and (found := latest_checkpoint(path)):
            logger.info(
                "resume_from_checkpoint %s holds checkpoints: resuming from %s", path, found
            )
            return str(found)
        return str(path)
    found = latest_checkpoint(output_dir)
    if found is None:
        logger.info("resume_from_checkpoint auto: no checkpoint in %s, starting fresh", output_dir)
    else:
        logger.info("resuming from %s", found)
    return str(found) if found else None
