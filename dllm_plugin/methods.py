"""The method table: which `training_method` x `diffusion_type` trains which model
families, and how.

A method owns its loss (the Trainer class, which also picks its collator and
TrainingArguments) and its sampler; a family owns loading, tokenizer set-up and LoRA
targets (models/families.py). Adding a method or a family is a new row here plus the
module it names: no `if method == ...` elsewhere. Config-time checks read this table
too, so a combination it does not list fails before anything is loaded.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, ModelError

logger = logging.getLogger(__name__)


MDLM, BD3LM = "mdlm", "bd3lm"
DIFFUSION_TYPES = (MDLM, BD3LM)


@dataclass(frozen=True)
class Method:
    """One `training_method` with one `diffusion_type`."""

    name: str
    families: tuple[str, ...]  # the model families it trains
    trainer: str  # "module:Class" of its Trainer (relative to this package)
    sampler: str  # "module:function" of its sampler
    summary: str  # one line for messages and docs
    weight_option: str | None  # the manifest parameter that holds its loss weighting, if any
    diffusion_type: str = MDLM
    # Options that mean nothing for this method. Set away from their default they are
    # a warning (the original plugin's saved templates carry every option), or a config
    # error for methods that are new enough to have no such templates.
    inapplicable: tuple[str, ...] = ()
    strict_options: bool = False
    # Packing (data/packing.py): whether the method trains on packed rows, and the
    # options that act on padded batches only (a packing job that sets them is warned).
    packs: bool = True
    padding_only: tuple[str, ...] = ()
    # family -> the model_types of it this method takes (a family not listed: all of them)
    model_types: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def trainer_class(self) -> Any:
        return _load(self.trainer)

    def sampler_function(self) -> Any:
        return _load(self.sampler)

    def bound_scorer(self, block_size: int | None = None) -> Any:
        """What evaluation scores its NLL bound with (evaluation/elbo.py): the Trainer
        class's evaluation hooks; for block diffusion, with the block size the model was
        trained with (the job's, or the saved model's recipe)."""
        trainer = self.trainer_class()
        if self.diffusion_type != BD3LM:
            return trainer
        if not block_size:
            raise ModelError(
                f"{self.title}: the block size the model was trained with is unknown "
                "(no diffusion_recipe.json beside it)"
            )
        return trainer.with_block_size(block_size)

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.diffusion_type

    @property
    def title(self) -> str:
        """How messages name it: the training_method, and the diffusion_type unless mdlm."""
        suffix = (
            f" with diffusion_type {self.diffusion_type!r}" if self.diffusion_type != MDLM else ""
        )
        return f"training_method {self.name!r}{suffix}"

    def sampling_block_size(self, block_size: int) -> int | None:
        """The block length its sampler must use: block diffusion samples with the block
        size it was trained with; MDLM picks its own (None)."""
        return block_size if self.diffusion_type == BD3LM else None

    def row_length(self, max_length: int, block_size: int) -> int:
        """The longest tokenised row: block diffusion fills rows to whole blocks, so its
        rows are cut at a whole number of blocks (the fill then never passes max_length)."""
        if self.diffusion_type != BD3LM:
            return max_length
        if block_size > max_length:
            raise ConfigError(
                f"block_size: {block_size} is more than max_length {max_length} (after the "
                "model's position limit)"
            )
        return max_length // block_size * block_size


# DiffusionGemma's own options: meaningless for the masked-diffusion methods.
_DIFFUSION_GEMMA_OPTIONS = (
    "canvas_length",
    "encoder_loss_weight",
    "encoder_loss_scope",
    "self_conditioning_prob",
)
_MDLM_ONLY = ("perbatch_cutoff", "resp_cutoff_ratio", "loss_weight_type")
# Block diffusion draws one timestep per block (diffusion/blocks.py): the per-example
# estimators do not apply.
_PER_EXAMPLE_NOISE = ("timestep_sampling", "complementary_masking")
# BERT-family types whose positions start at 0 and whose attention takes any 4-D mask:
# RoBERTa-style models number positions from the padding id, ModernBERT adds its own
# local attention windows, which a block mask would silently replace.
_BD3LM_BERT_TYPES = ("bert", "distilbert")

_ROWS = (
    Method(
        name="bert",
        families=("bert",),
        trainer="trainers:MDLMTrainer",
        sampler="sampling:generate_mdlm",
        summary="MDLM SFT of a BERT-family masked LM turned into a chat model",
        weight_option="mdlm_loss_weight_type",
        inapplicable=(*_MDLM_ONLY, "block_size", *_DIFFUSION_GEMMA_OPTIONS),
    ),
    Method(
        name="llada",
        families=("llada",),
        trainer="trainers:MDLMTrainer",
        sampler="sampling:generate_mdlm",
        summary="MDLM SFT of LLaDA",
        weight_option="mdlm_loss_weight_type",
        inapplicable=(*_MDLM_ONLY, "block_size", *_DIFFUSION_GEMMA_OPTIONS),
    ),
    Method(
        name="dream",
        families=("dream",),
        trainer="trainers:DreamTrainer",
        sampler="sampling:generate_dream",
        summary="Dream SFT: right-shifted logits, CART weights, per-batch response cut-off",
        weight_option="loss_weight_type",
        inapplicable=("mdlm_loss_weight_type", "block_size", *_DIFFUSION_GEMMA_OPTIONS),
        padding_only=("perbatch_cutoff", "resp_cutoff_ratio"),
    ),
    Method(
        name="diffusion_gemma",
        families=("diffusion_gemma",),
        trainer="diffusion_gemma_trainer:DiffusionGemmaTrainer",
        sampler="sampling:generate_diffusion_gemma",
        summary="block-diffusion SFT of DiffusionGemma: uniform-token noise on one answer "
        "block, self-conditioning, encoder causal-LM loss",
        weight_option=None,
        # Masking schedules, loss weightings, the Dream cut-offs and the masked-diffusion
        # estimators do not exist here; the loss is token-normalised; the prompt is never
        # on the canvas (the encoder loss has its own scope option); its block is
        # canvas_length. Its own recipe is its `mdlm` row: diffusion_type bd3lm is refused.
        inapplicable=(
            "noise_schedule",
            "mdlm_loss_weight_type",
            "loss_weight_type",
            "loss_norm_type",
            "perbatch_cutoff",
            "resp_cutoff_ratio",
            "mask_prompt_loss",
            "block_size",
            *_PER_EXAMPLE_NOISE,
        ),
        strict_options=True,
        packs=False,
    ),
    Method(
        name="a2d",
        families=("a2d",),
        trainer="trainers:MDLMTrainer",
        sampler="sampling:generate_mdlm",
        summary="a causal LM (Qwen2, Qwen3, Llama, Mistral) made bidirectional, then MDLM SFT",
        weight_option="mdlm_loss_weight_type",
        inapplicable=(*_MDLM_ONLY, "block_size", *_DIFFUSION_GEMMA_OPTIONS),
        strict_options=True,
    ),
    # Block diffusion (BD3LM): new combinations, so options that mean nothing are errors.
    Method(
        name="bert",
        diffusion_type=BD3LM,
        families=("bert",),
        trainer="trainers:BD3LMTrainer",
        packs=False,  # the 2L layout is per example already
        sampler="block_sampler:generate_bd3lm",
        summary="block-diffusion (BD3LM) SFT of a BERT-family masked LM",
        weight_option="mdlm_loss_weight_type",
        inapplicable=(*_MDLM_ONLY, *_PER_EXAMPLE_NOISE, *_DIFFUSION_GEMMA_OPTIONS),
        strict_options=True,
        model_types=(("bert", _BD3LM_BERT_TYPES),),
    ),
    Method(
        name="llada",
        diffusion_type=BD3LM,
        families=("llada",),
        trainer="trainers:BD3LMTrainer",
        packs=False,  # the 2L layout is per example already
        sampler="block_sampler:generate_bd3lm",
        summary="block-diffusion (BD3LM) SFT of LLaDA",
        weight_option="mdlm_loss_weight_type",
        inapplicable=(*_MDLM_ONLY, *_PER_EXAMPLE_NOISE, *_DIFFUSION_GEMMA_OPTIONS),
        strict_options=True,
    ),
    Method(
        name="dream",
        diffusion_type=BD3LM,
        families=("dream",),
        trainer="trainers:DreamBD3LMTrainer",
        packs=False,
        sampler="block_sampler:generate_bd3lm_shifted",
        summary="block-diffusion (BD3LM) SFT of Dream: right-shifted logits, block-wise CART",
        weight_option="loss_weight_type",
        inapplicable=("mdlm_loss_weight_type", *_PER_EXAMPLE_NOISE, *_DIFFUSION_GEMMA_OPTIONS),
        strict_options=True,
    ),
    Method(
        name="a2d",
        diffusion_type=BD3LM,
        families=("a2d",),
        trainer="trainers:BD3LMTrainer",
        packs=False,  # the 2L layout is per example already
        sampler="block_sampler:generate_bd3lm",
        summary="a causal LM made bidirectional, then block-diffusion (BD3LM) SFT",
        weight_option="mdlm_loss_weight_type",
        inapplicable=(*_MDLM_ONLY, *_PER_EXAMPLE_NOISE, *_DIFFUSION_GEMMA_OPTIONS),
        strict_options=True,
    ),
)
METHODS: dict[tuple[str, str], Method] = {m.key: m for m in _ROWS}
AUTO = "auto"


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), attr)


def method_row(training_method: str, diffusion_type: str = MDLM) -> Method:
    """The table's row; a combination it lacks is a config error."""
    try:
        return METHODS[(training_method, diffusion_type)]
    except KeyError:
        raise ConfigError(
            f"diffusion_type: {diffusion_type!r} is not available with training_method "
            f"{training_method!r}"
        ) from None


def default_method(family: str, diffusion_type: str = MDLM) -> Method:
    """The method `auto` picks for a family (the first row that trains it)."""
    for method in METHODS.values():
        if family in method.families and method.diffusion_type == diffusion_type:
            return method
    raise ModelError(f"no training method trains {family} models with {diffusion_type}")


def resolve_method(
    training_method: str,
    family: str,
    model_name: str,
    diffusion_type: str = MDLM,
    model_type: str | None = None,
) -> Method:
    """The method for this model; a method that does not fit the family (or, where the
    row names them, the model_type) is an error."""
    if training_method == AUTO:
        method = default_method(family, diffusion_type)
    else:
        method = method_row(training_method, diffusion_type)
    if family not in method.families:
        fits = sorted({m.name for m in METHODS.values() if family in m.families})
        raise ModelError(
            f"training_method {training_method!r} does not fit model {model_name!r}, which is a "
            f"{family} model: use training_method {' or '.join(repr(m) for m in fits)} or 'auto'"
        )
    allowed = dict(method.model_types).get(family)
    if allowed is not None and model_type is not None and model_type.lower() not in allowed:
        raise ModelError(
            f"diffusion_type {diffusion_type!r} does not support model {model_name!r} "
            f"(model_type {model_type!r}); with {family} models it takes model_type "
            f"{' or '.join(repr(t) for t in allowed)}"
        )
    return method


def option_problems(method: Method, cfg: Any) -> list[str]:
    """Options the job set away from their default that this method ignores."""
    from .config import defaults

    default = defaults()
    problems = [
        f"{name}: {cfg.params[name]!r} has no effect with {method.title} "
        f"({method.summary}); leave it at its default {default[name]!r}"
        for name in method.inapplicable
        if name in cfg.given and cfg.params[name] != default[name]
    ]
    if cfg.params.get("packing"):
        problems += [
            f"{name}: {cfg.params[name]!r} has no effect with packing (it acts on padded "
            f"batches); leave it at its default {default[name]!r}"
            for name in method.padding_only
            if name in cfg.given and cfg.params[name] != default[name]
        ]
    return problems


def check_packing(method: Method, model_config: dict[str, Any]) -> None:
    """Refuse packing, naming why, for a method or model type that cannot pack."""
    from .models.packing import packed_inputs_for

    if not method.packs:
        raise ConfigError(
            f"packing: {method.title} does not train on packed rows; set packing to false"
        )
    packed_inputs_for(model_config)


def check_method_options(method: Method, cfg: Any) -> None:
    """Raise (strict methods) or warn about options this method ignores."""
    problems = option_problems(method, cfg)
    if problems and method.strict_options:
        raise ConfigError(problems)
    for problem in problems:
        logger.warning("%s", problem)


RECIPE_FILE = "diffusion_recipe.json"
"""Written beside every saved model and adaptor: how it was trained, so generate (and
evaluation) sample it as it was trained (block diffusion: with its block size)."""


def recipe(method: Method, block_size: int) -> dict[str, Any]:
    """What a saved model's sampler needs to know about its training."""
    record: dict[str, Any] = {
        "training_method": method.name,
        "diffusion_type": method.diffusion_type,
    }
    if method.sampling_block_size(block_size) is not None:
        record["block_size"] = block_size
    return record


def read_recipe(folder: str | Path) -> dict[str, Any] | None:
    """The folder's recipe, or None when it has none (any model not trained here)."""
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{str(path)!r} is not a readable recipe ({e})") from None
    valid = (
        isinstance(data, dict)
        and (data.get("training_method"), data.get("diffusion_type")) in METHODS
        and isinstance(data.get("block_size", 1), int)
        and data.get("block_size", 1) >= 1
    )
    if not valid:
        raise ModelError(f"{str(path)!r} does not describe a training method of this trainer")
    return data


def saved_method(recipe_data: dict[str, Any] | None, family: str) -> Method:
    """The method a saved model was trained with (its recipe), else the family's MDLM one."""
    if recipe_data is None:
        return default_method(family)
    return resolve_method(
        recipe_data["training_method"], family, "the saved model", recipe_data["diffusion_type"]
    )
