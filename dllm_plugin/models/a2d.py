"""a2d: an autoregressive checkpoint (Qwen2, Qwen3, Llama, Mistral) as a diffusion model.

transformers builds the attention mask of these decoders through its mask helpers,
which return a bidirectional mask (padding keys masked, nothing causal) when the
config says ``is_causal = False``; the sdpa/flash kernels receive the same flag. So
the causal LM's own classes and weights become a bidirectional network by their
config alone: no modelling code is copied here.

A converted model is saved under its own ``model_type`` (``a2d-qwen2``, ...) whose
config class defaults to ``is_causal = False``. Registered with ``AutoConfig`` and
``AutoModelForMaskedLM`` (importing ``dllm_plugin.models`` does it), it reloads
bidirectional with no remote code; a loader that does not know the type fails loudly
instead of silently running it causal, which a plain ``qwen2`` config with
``is_causal: false`` would do on older transformers, vLLM or llama.cpp.

The mask token. These tokenizers have none: ``<|mask|>`` is added as a special token
(families.py), and its embedding row (and head row when untied) is set, at conversion,
to the mean of the rows of every other token the tokenizer has. The mean is a neutral
input the network has seen the neighbourhood of (a random row has a norm unlike any
real token's), it needs no random draw, so the same base model and tokenizer give the
same row in every run and process (a LoRA adaptor reapplied to a freshly converted base
sees exactly the row it was trained with), and spare padded rows (Qwen reserves about
270 beyond its tokenizer) stay out of it. When the tokenizer outgrows the checkpoint's
rows (Llama-3: 128256 of 128256 used) the embedding and head are resized first; any
other new row is initialised by the model's own init under the job's seed.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ..errors import ModelError

A2D_PREFIX = "a2d-"
MASK_TOKEN = "<|mask|>"


class A2DQwen2Config(Qwen2Config):
    """Qwen2 made bidirectional (a2d)."""

    model_type = "a2d-qwen2"
    is_causal: bool = False
    mask_token_id: int | None = None


class A2DQwen2ForMaskedLM(Qwen2ForCausalLM):
    config_class = A2DQwen2Config


class A2DQwen3Config(Qwen3Config):
    """Qwen3 made bidirectional (a2d)."""

    model_type = "a2d-qwen3"
    is_causal: bool = False
    mask_token_id: int | None = None


class A2DQwen3ForMaskedLM(Qwen3ForCausalLM):
    config_class = A2DQwen3Config


class A2DLlamaConfig(LlamaConfig):
    """Llama made bidirectional (a2d)."""

    model_type = "a2d-llama"
    is_causal: bool = False
    mask_token_id: int | None = None


class A2DLlamaForMaskedLM(LlamaForCausalLM):
    config_class = A2DLlamaConfig


class A2DMistralConfig(MistralConfig):
    """Mistral made bidirectional (a2d)."""

    model_type = "a2d-mistral"
    is_causal: bool = False
    mask_token_id: int | None = None


class A2DMistralForMaskedLM(MistralForCausalLM):
    config_class = A2DMistralConfig


# causal-LM model_type -> (its a2d config class, its a2d model class)
A2D_CLASSES: dict[str, tuple[type[PretrainedConfig], type]] = {
    "qwen2": (A2DQwen2Config, A2DQwen2ForMaskedLM),
    "qwen3": (A2DQwen3Config, A2DQwen3ForMaskedLM),
    "llama": (A2DLlamaConfig, A2DLlamaForMaskedLM),
    "mistral": (A2DMistralConfig, A2DMistralForMaskedLM),
}
SOURCE_MODEL_TYPES = tuple(A2D_CLASSES)
SOURCE_ARCHITECTURES = tuple(model.__mro__[1].__name__ for _, model in A2D_CLASSES.values())
A2D_ARCHITECTURES = tuple(model.__name__ for _, model in A2D_CLASSES.values())


def register_a2d_models() -> None:
    """Make saved a2d models loadable by their model_type (idempotent)."""
    for config_cls, model_cls in A2D_CLASSES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForMaskedLM.register(config_cls, model_cls, exist_ok=True)


def is_a2d_model_type(model_type: str) -> bool:
    """A causal LM a2d converts, or a model it converted."""
    model_type = model_type.lower()
    return model_type in A2D_CLASSES or model_type in {
        c.model_type for c, _ in A2D_CLASSES.values()
    }


_NOT_CARRIED = ("model_type", "architectures", "auto_map", "transformers_version", "is_causal")


def a2d_config(causal: PretrainedConfig) -> PretrainedConfig:
    """The a2d config of a causal LM's config: same fields, bidirectional, no sliding window.

    Sliding windows are turned off: the converted model attends over the whole sequence
    (for rows shorter than the window, as Mistral's 4096, that is what it computed).
    """
    config_cls, _ = A2D_CLASSES[causal.model_type]
    fields = {k: v for k, v in causal.to_dict().items() if k not in _NOT_CARRIED}
    fields["is_causal"] = False
    if "sliding_window" in fields:
        fields["sliding_window"] = None
    if fields.get("use_sliding_window"):
        fields["use_sliding_window"] = False
    if fields.get("layer_types"):
        fields["layer_types"] = ["full_attention"] * len(fields["layer_types"])
    return config_cls(**fields)


def load_pretrained(
    model_path: str, mask_token_id: int | None, tokenizer_size: int | None, **kwargs: Any
) -> Any:
    """An a2d model from a causal checkpoint (converted) or from a saved a2d one (as is).

    Returns what ``from_pretrained`` returns for these kwargs (with
    ``output_loading_info=True`` a (model, info) pair).
    """
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
    if config.model_type.startswith(A2D_PREFIX):
        return AutoModelForMaskedLM.from_pretrained(model_path, trust_remote_code=False, **kwargs)
    if config.model_type not in A2D_CLASSES:
        raise ModelError(
            f"model_name: model_type {config.model_type!r} is not one a2d converts "
            f"({', '.join(SOURCE_MODEL_TYPES)})"
        )
    if mask_token_id is None or tokenizer_size is None:
        raise ValueError("converting a causal LM needs the tokenizer's mask id and size")
    _, model_cls = A2D_CLASSES[config.model_type]
    loaded = model_cls.from_pretrained(
        model_path, config=a2d_config(config), trust_remote_code=False, **kwargs
    )
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    add_mask_row(model, mask_token_id, tokenizer_size)
    return loaded


@torch.no_grad()
def add_mask_row(model: Any, mask_token_id: int, tokenizer_size: int) -> None:
    """Give the mask token its rows: resize when the tokenizer outgrew the checkpoint, then
    the mean of every other token's row (module docstring: why the mean)."""
    if not 0 <= mask_token_id < tokenizer_size:
        raise ValueError(f"mask id {mask_token_id} is outside the tokenizer's {tokenizer_size}")
    if model.get_input_embeddings().weight.shape[0] < tokenizer_size:
        model.resize_token_embeddings(tokenizer_size, mean_resizing=False)
    embedding = model.get_input_embeddings().weight
    _set_to_mean(embedding, mask_token_id, tokenizer_size)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not embedding:
        _set_to_mean(head.weight, mask_token_id, tokenizer_size)
        if getattr(head, "bias", None) is not None:
            _set_to_mean(head.bias, mask_token_id, tokenizer_size)
    model.config.mask_token_id = mask_token_id


def _set_to_mean(rows: torch.Tensor, index: int, count: int) -> None:
    """rows[index] = the fp32 mean of rows[:count] other than rows[index]."""
    total = rows[:count].float().sum(dim=0) - rows[index].float()
    rows[index] = (total / max(count - 1, 1)).to(rows.dtype)


register_a2d_models()
