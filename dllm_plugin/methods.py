"""The method table: which `training_method` trains which model families, and how.

A method owns its loss (the Trainer class, which also picks its collator and
TrainingArguments) and its sampler; a family owns loading, tokenizer set-up and LoRA
targets (models/families.py). Adding a method or a family is a new row here plus the
module it names: no `if method == ...` elsewhere. Config-time checks read this table
too, so a combination it does not list fails before anything is loaded.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, ModelError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """One `training_method`."""

    name: str
    families: tuple[str, ...]  # the model families it trains
    trainer: str  # "module:Class" of its Trainer (relative to this package)
    sampler: str  # "module:function" of its sampler
    summary: str  # one line for messages and docs
    weight_option: str | None  # the manifest parameter that holds its loss weighting, if any
    # Options that mean nothing for this method. Set away from their default they are
    # a warning (the original plugin's saved templates carry every option), or a config
    # error for methods that are new enough to have no such templates.
    inapplicable: tuple[str, ...] = ()
    strict_options: bool = False

    def trainer_class(self) -> Any:
        return _load(self.trainer)

    def sampler_function(self) -> Any:
        return _load(self.sampler)


# DiffusionGemma's own options: meaningless for the masked-diffusion methods.
_BLOCK_DIFFUSION_OPTIONS = (
    "canvas_length",
    "encoder_loss_weight",
    "encoder_loss_scope",
    "self_conditioning_prob",
)

METHODS: dict[str, Method] = {
    "bert": Method(
        name="bert",
        families=("bert",),
        trainer="trainers:MDLMTrainer",
        sampler="sampling:generate_mdlm",
        summary="MDLM SFT of a BERT-family masked LM turned into a chat model",
        weight_option="mdlm_loss_weight_type",
        inapplicable=(
            "perbatch_cutoff",
            "resp_cutoff_ratio",
            "loss_weight_type",
            *_BLOCK_DIFFUSION_OPTIONS,
        ),
    ),
    "llada": Method(
        name="llada",
        families=("llada",),
        trainer="trainers:MDLMTrainer",
        sampler="sampling:generate_mdlm",
        summary="MDLM SFT of LLaDA",
        weight_option="mdlm_loss_weight_type",
        inapplicable=(
            "perbatch_cutoff",
            "resp_cutoff_ratio",
            "loss_weight_type",
            *_BLOCK_DIFFUSION_OPTIONS,
        ),
    ),
    "dream": Method(
        name="dream",
        families=("dream",),
        trainer="trainers:DreamTrainer",
        sampler="sampling:generate_dream",
        summary="Dream SFT: right-shifted logits, CART weights, per-batch response cut-off",
        weight_option="loss_weight_type",
        inapplicable=("mdlm_loss_weight_type", *_BLOCK_DIFFUSION_OPTIONS),
    ),
    "diffusion_gemma": Method(
        name="diffusion_gemma",
        families=("diffusion_gemma",),
        trainer="diffusion_gemma_trainer:DiffusionGemmaTrainer",
        sampler="sampling:generate_diffusion_gemma",
        summary="block-diffusion SFT of DiffusionGemma: uniform-token noise on one answer "
        "block, self-conditioning, encoder causal-LM loss",
        weight_option=None,
        # Masking schedules, loss weightings and the Dream cut-offs do not exist here; the
        # loss is token-normalised; the prompt is never on the canvas (the encoder loss has
        # its own scope option).
        inapplicable=(
            "noise_schedule",
            "mdlm_loss_weight_type",
            "loss_weight_type",
            "loss_norm_type",
            "perbatch_cutoff",
            "resp_cutoff_ratio",
            "mask_prompt_loss",
        ),
        strict_options=True,
    ),
}
AUTO = "auto"


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), attr)


def default_method(family: str) -> Method:
    """The method `auto` picks for a family (the first row that trains it)."""
    for method in METHODS.values():
        if family in method.families:
            return method
    raise ModelError(f"no training method trains {family} models")


def resolve_method(training_method: str, family: str, model_name: str) -> Method:
    """The method for this model; a method that does not fit the family is an error."""
    if training_method == AUTO:
        return default_method(family)
    method = METHODS[training_method]
    if family not in method.families:
        fits = [m.name for m in METHODS.values() if family in m.families]
        raise ModelError(
            f"training_method {training_method!r} does not fit model {model_name!r}, which is a "
            f"{family} model: use training_method {' or '.join(repr(m) for m in fits)} or 'auto'"
        )
    return method


def option_problems(method: Method, cfg: Any) -> list[str]:
    """Options the job set away from their default that this method ignores."""
    from .config import defaults

    default = defaults()
    return [
        f"{name}: {cfg.params[name]!r} has no effect with training_method {method.name!r} "
        f"({method.summary}); leave it at its default {default[name]!r}"
        for name in method.inapplicable
        if name in cfg.given and cfg.params[name] != default[name]
    ]


def check_method_options(method: Method, cfg: Any) -> None:
    """Raise (strict methods) or warn about options this method ignores."""
    problems = option_problems(method, cfg)
    if problems and method.strict_options:
        raise ConfigError(problems)
    for problem in problems:
        logger.warning("%s", problem)
