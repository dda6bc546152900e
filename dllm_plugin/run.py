"""One training job, top to bottom: config -> data -> model -> Trainer -> outputs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .callbacks import HostCallback, StopSignals, use_loss_progress_bar
from .checkpoints import latest_checkpoint
from .config import JobConfig, looks_like_path, resolve_path
from .data.packing import PackOptions, pack_dataset
from .data.sft import TokenizeOptions, build_sft_dataset, split_train_eval
from .data.sources import FILE_KINDS, line_limit, load_local_dataset, load_named_dataset
from .data.templates import RowTemplates
from .destinations import Destination, check_destinations, planned_destinations
from .errors import ConfigError, DataError
from .evaluation import lm_eval_tasks
from .evaluation.held_out import HeldOutEvaluation
from .hosts import Host
from .jobdir import write_summary
from .methods import Method, check_method_options, check_packing, resolve_method
from .models.families import (
    TokenIds,
    detect_family,
    load_tokenizer,
    position_limit,
    prepare_tokenizer,
    read_model_config,
)
from .models.loading import LoadOptions, load_model, resolve_model_path
from .outputs import save_outputs
from .plots import plot_loss_curves
from .preview import (
    PreviewCallback,
    PreviewPrompt,
    as_records,
    generate_previews,
    log_previews,
    pick_prompts,
    write_tensorboard_text,
)
from .training_args import resolve_resume, training_arguments

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything the Trainer needs, built before any weight is loaded where possible."""

    method: Method
    family: str
    model_path: str
    model_config: dict[str, Any]
    tokenizer: Any
    ids: TokenIds
    train: Any
    eval: Any
    preview_prompts: list[PreviewPrompt]


def check_job(cfg: JobConfig, host: Host) -> list[Destination]:
    """Every check that needs neither data nor weights nor a write, before the job takes
    its output folder: devices, names, and where the models will go."""
    check_device(cfg)
    model_path = resolve_model(cfg)
    planned = planned_destinations(cfg, host.models_dir())
    dataset = resolve_path(cfg.dataset_name, cfg.source_dir) if cfg.dataset_name else None
    protected = {
        "base model": Path(model_path) if Path(model_path).exists() else None,
        "dataset": dataset if dataset is not None and dataset.exists() else None,
        "output_dir": Path(cfg.output_dir),
    }
    check_destinations(planned, protected, protected["base model"])
    return planned


def resolve_model(cfg: JobConfig) -> str:
    """A local folder (relative paths against the job file's folder first), an offline
    package model, or the hub id as given."""
    if not cfg.model_name:
        raise ConfigError("model_name: required (a hub id or a local model folder)")
    local = resolve_path(cfg.model_name, cfg.source_dir)
    return resolve_model_path(str(local) if local.exists() else cfg.model_name)


def prepare(cfg: JobConfig, host: Host) -> Prepared:
    """Family, method, tokenizer and tokenised data: every check that needs no weights."""
    model_path = resolve_model(cfg)
    model_config = read_model_config(model_path)
    family = detect_family(model_config)
    method = resolve_method(
        cfg.training_method,
        family,
        cfg.model_name,
        cfg.diffusion_type,
        model_config.get("model_type"),
    )
    check_method_options(method, cfg)
    if cfg.packing:
        check_packing(method, model_config)
    logger.info("model %s: %s family, %s", cfg.model_name, family, method.title)
    tokenizer = load_tokenizer(model_path, family)
    ids = prepare_tokenizer(tokenizer, family, model_config)
    max_length = clamp_max_length(cfg.max_length, position_limit(model_config, family))
    max_length = method.row_length(max_length, cfg.block_size)
    rows = load_rows(cfg, host)
    train_rows, eval_rows = split_train_eval(rows, cfg.eval_split_ratio, cfg.seed)
    templates = RowTemplates(
        cfg.input_template or "",
        cfg.output_template or "",
        cfg.instruction_template or "",
        max_chars=line_limit(max_length),
    )
    opts = TokenizeOptions(max_length, cfg.truncation, cfg.mask_prompt_loss)
    train = build_sft_dataset(
        train_rows, tokenizer, templates, opts, cfg.num_proc, "train", keep_messages=True
    )
    evalset = (
        build_sft_dataset(
            eval_rows, tokenizer, templates, opts, cfg.num_proc, "eval", keep_messages=True
        )
        if eval_rows is not None
        else None
    )
    logger.info(
        "data: %d train rows, %s eval rows",
        len(train),
        len(evalset) if evalset is not None else "no",
    )
    # Held-out prompts when there is an eval split; else the first training prompts.
    source = evalset if evalset is not None else train
    n = min(cfg.num_preview_samples, len(source))
    prompts = pick_prompts(source.select(range(n))["messages"], n) if n else []
    if cfg.packing:
        train, evalset = pack_splits(cfg, method, ids, max_length, train, evalset)
    return Prepared(
        method, family, model_path, model_config, tokenizer, ids, train, evalset, prompts
    )


def pack_splits(
    cfg: JobConfig, method: Method, ids: TokenIds, max_length: int, train: Any, evalset: Any
) -> tuple[Any, Any]:
    """Both splits packed into rows of up to max_length tokens (data/packing.py)."""
    shifted = method.trainer_class().shift_logits
    opts = PackOptions(
        max_length, ids.eos_id, cfg.packing_trailing_eos, shifted, ids.bos_id, cfg.seed
    )
    packed = [
        pack_dataset(split.remove_columns("messages"), opts, name) if split is not None else None
        for split, name in ((train, "train"), (evalset, "eval"))
    ]
    return packed[0], packed[1]


def clamp_max_length(max_length: int, limit: int | None) -> int:
    """max_length, or the model's position limit when it is lower (one warning line): the
    manifest's default 1024 must work on 512-position BERT models."""
    if limit is None or max_length <= limit:
        return max_length
    logger.warning(
        "max_length %d is more than this model's %d positions: using max_length %d",
        max_length,
        limit,
        limit,
    )
    return limit


def load_rows(cfg: JobConfig, host: Host) -> Any:
    """The dataset as a DatasetDict: from the host, a local path, or the hub."""
    if not cfg.dataset_name:
        raise ConfigError(
            "dataset_name: required (a local file/folder, a host dataset or a hub id)"
        )
    from_host = host.load_dataset(cfg)
    if from_host is not None:
        return from_host
    path = resolve_path(cfg.dataset_name, cfg.source_dir)
    if path.exists():
        return load_local_dataset(path, line_limit(cfg.max_length))
    if looks_like_path(cfg.dataset_name) or path.suffix.lower() in FILE_KINDS:
        raise DataError(f"dataset_name: the file or folder {cfg.dataset_name!r} does not exist")
    return load_named_dataset(cfg.dataset_name, cfg.dataset_config_name)


def build_trainer(
    cfg: JobConfig,
    prep: Prepared,
    model: Any,
    host: Host,
    stop: StopSignals,
    held_out: HeldOutEvaluation | None = None,
) -> Any:
    """The method's Trainer with its collator, callbacks and held-out evaluation."""
    args = training_arguments(
        cfg, prep.method, has_eval=prep.eval is not None, inside_host=host.inside_host
    )
    trainer_cls = prep.method.trainer_class()
    collator = trainer_cls.collator(prep.ids, cfg, prep.model_config)
    eval_features = features_only(prep.eval) if prep.eval is not None else None
    previews = []
    if cfg.sample_every_eval and prep.preview_prompts:
        previews.append(
            PreviewCallback(
                prep.tokenizer,
                prep.ids,
                prep.method,
                prep.preview_prompts,
                cfg.preview_max_new_tokens,
                host,
                prep.method.sampling_block_size(cfg.block_size),
            )
        )
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=features_only(prep.train),
        eval_dataset=eval_features,
        data_collator=collator,
        processing_class=prep.tokenizer,
        mask_token_id=prep.ids.mask_id,
        bos_token_id=prep.ids.bos_id,
        held_out=held_out,
        callbacks=[HostCallback(host, stop), *previews],
    )
    use_loss_progress_bar(trainer)
    for callback in previews:
        callback.trainer = trainer
    return trainer


def features_only(split: Any) -> Any:
    """The split without its messages column (packed splits have none)."""
    return split.remove_columns("messages") if "messages" in split.column_names else split


def run_job(cfg: JobConfig, host: Host) -> dict[str, Any]:
    """Train, evaluate, save; return the run summary (rank 0 also writes it to output_dir).

    The caller has run `check_job` and, in the process that owns the job, claimed
    output_dir (jobdir.py); a failure here is recorded there.
    """
    started = time.time()
    output_dir = Path(cfg.output_dir)
    host.configure(cfg)
    for dest in planned_destinations(cfg, host.models_dir()):
        logger.info("the trained %s will be saved to %s", dest.kind, dest.path)
    prep = prepare(cfg, host)
    tasks = lm_eval_tasks.plan(cfg)  # checked before any weight is loaded
    loaded = load_model(prep.model_path, prep.family, load_options(cfg), prep.ids)
    stop = StopSignals()
    held_out = HeldOutEvaluation.for_job(cfg, prep)
    trainer = build_trainer(cfg, prep, loaded.model, host, stop, held_out)
    resume = resolve_resume(cfg.resume_from_checkpoint, output_dir)
    before = preview_answers(cfg, prep, trainer, "preview before training") if not resume else None
    held_out_before = held_out.before_training(trainer) if held_out and not resume else None
    with stop.installed():
        result = trainer.train(resume_from_checkpoint=resume)
    # A stop that arrives with the last step has nothing left to stop.
    finished = not stop.requested or trainer.state.global_step >= trainer.state.max_steps
    metrics = dict(result.metrics)
    if finished and held_out is not None:
        metrics.update(held_out.final_evaluation(trainer))
    summary: dict[str, Any] = {
        "status": "complete" if finished else "stopped",
        "method": prep.method.name,
        "diffusion_type": prep.method.diffusion_type,
        "model_name": cfg.model_name,
        "global_step": trainer.state.global_step,
        "train_loss": metrics.get("train_loss"),
        "eval_loss": metrics.get("eval_loss"),
        "metrics": metrics,
        "log_history": trainer.state.log_history,
        "trainable_params": loaded.trainable_params,
        "total_params": loaded.total_params,
        "elapsed_seconds": round(time.time() - started, 1),
    }
    if held_out is not None:
        summary["held_out"] = held_out.summary(held_out_before, metrics)
    summary["score"] = score(metrics)
    after = preview_answers(cfg, prep, trainer, "preview after training") if finished else None
    if after is not None:
        summary["samples"] = as_records(prep.preview_prompts, after, before)
        write_tensorboard_text(trainer, summary["samples"], trainer.state.global_step)
        host.add_data("preview_samples", summary["samples"])
    if trainer.is_world_process_zero():
        if finished:
            summary.update(save_outputs(cfg, prep, trainer, host))
        else:
            summary["checkpoint"] = str(latest_checkpoint(output_dir))
        if finished or host.stop_grace_s is None:  # a stop against the clock skips the plot
            summary["loss_plot"] = plot_loss_curves(trainer.state.log_history, output_dir)
        write_summary(output_dir, summary)
        if finished and tasks:  # after the model is saved: a failing task cannot lose it
            lm_eval_tasks.run_after_training(tasks, cfg, prep, trainer, host, summary)
    return summary


def score(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers a host ranks runs by (lower loss and bound, higher accuracy: better)."""
    keys = ("eval_loss", "train_loss", "eval_nll_bound", "eval_nll_bound_se")
    keys += ("eval_exact_match", "eval_token_f1")
    return {k: metrics[k] for k in keys if isinstance(metrics.get(k), int | float)}


def preview_answers(cfg: JobConfig, prep: Prepared, trainer: Any, title: str) -> list[str] | None:
    """Answers to the preview prompts (main process only; not for sharded models)."""
    if not prep.preview_prompts or not trainer.is_world_process_zero():
        return None
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        logger.info("previews are skipped with fsdp/deepspeed (the weights are sharded)")
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    answers = generate_previews(
        model,
        prep.tokenizer,
        prep.ids,
        prep.method,
        prep.preview_prompts,
        cfg.preview_max_new_tokens,
        prep.method.sampling_block_size(cfg.block_size),
    )
    log_previews(title, prep.preview_prompts, answers)
    return answers


def load_options(cfg: JobConfig) -> LoadOptions:
    return LoadOptions(
        dtype=cfg.dtype,
        load_in_4bit=cfg.load_in_4bit,
        lora=cfg.lora,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        lora_target_modules=cfg.lora_target_modules,
        gradient_checkpointing=cfg.gradient_checkpointing,
        seed=cfg.seed,
    )


def check_device(cfg: JobConfig) -> None:
    """Refuse a device this machine does not have, instead of silently using another."""
    if cfg.train_device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train_device: 'cuda' is not allowed here: no CUDA device is visible; use 'cpu'"
        )
    if (
        cfg.dtype == "bfloat16"
        and cfg.train_device == "cuda"
        and not torch.cuda.is_bf16_supported()
    ):
        raise ConfigError(
            "dtype: 'bfloat16' is not supported by this GPU; use 'float16' or 'float32'"
        )
    if cfg.dtype == "bfloat16" and cfg.train_device == "cpu":
        logger.warning(
            "dtype bfloat16 on CPU runs under bf16 autocast and is several times slower than float32"
        )
