"""Model families: detection from the config, tokenizer set-up, LoRA targets.

Everything family-specific that is data (token names, chat templates, module names)
lives here, so the rest of the code asks "which family" once and never again.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import looks_like_path
from ..errors import ModelError, first_line
from .a2d import A2D_PREFIX, MASK_TOKEN, SOURCE_MODEL_TYPES, is_a2d_model_type

logger = logging.getLogger(__name__)

BERT_MODEL_TYPES = {"bert", "roberta", "xlm-roberta", "modernbert", "distilbert", "camembert"}

# Our chat template for encoders that have none: plain-text role markers, the
# separator token ends every turn (the end-of-answer marker the model learns to emit).
BERT_CHAT_TEMPLATE = (
    "{{ cls_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}System: {% elif m['role'] == 'user' %}User: {% else %}Assistant: {% endif %}"
    "{{ m['content'] }}{{ sep_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# Llama-3 shape used by LLaDA-Instruct: BOS once, header/content/eot per message.
LLADA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Qwen2.5 ChatML with its default system message, used when a Dream tokenizer has none.
DREAM_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# ChatML without a default system message: a2d base checkpoints that ship no template.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Gemma 4's turn format (DiffusionGemma's released template, without its thinking and
# tool branches), for DiffusionGemma tokenizers that ship no template.
DIFFUSION_GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class FamilySpec:
    name: str
    mask_tokens: tuple[str, ...]  # empty: the family has no mask token (uniform noise)
    eos_tokens: tuple[str, ...] = ()
    bos_tokens: tuple[str, ...] = ()
    eot_tokens: tuple[str, ...] = ()
    chat_template: str | None = None
    keep_own_template: bool = False
    lora_targets: tuple[str, ...] = ()
    # Module-name prefixes that belong to the output head: never LoRA targets.
    head_prefixes: tuple[str, ...] = field(default=())
    # The transformers class (an attribute of the transformers package) that loads it.
    model_class: str = "AutoModelForMaskedLM"
    # True: padding is trained as end-of-answer, so the collator pads with EOS. False: the
    # collator pads with the tokenizer's pad id and masks padding out of attention.
    trains_padding: bool = True
    # A regex the full name of every LoRA target must match (None: any Linear outside the
    # head), for models whose Linears are not all text-stack projections.
    lora_scope: str | None = None
    # Module-name patterns bitsandbytes must not quantise (None: the head prefixes).
    quantization_skip: tuple[str, ...] | None = None
    # peft's prepare_model_for_kbit_training casts every bf16/fp16 weight to fp32; False
    # for models whose unquantisable weights (MoE experts) would double in memory.
    kbit_upcast: bool = True
    # "module" (relative to this package) with the family's hooks: check_environment()
    # before loading, prepare_base(model) after loading, share_adaptors(model) after peft
    # wraps it (a new or a reloaded adaptor).
    hooks: str | None = None
    # The mask token added when the tokenizer has none (a2d); None: a missing one is an error.
    added_mask_token: str | None = None
    # "module:function" that loads the family's model (models/loading.py); "" = the Auto class.
    loader: str = ""


FAMILIES: dict[str, FamilySpec] = {
    "bert": FamilySpec(
        name="bert",
        mask_tokens=("[MASK]", "<mask>"),
        chat_template=BERT_CHAT_TEMPLATE,
        lora_targets=(
            "query",
            "key",
            "value",
            "dense",
            "q_lin",
            "k_lin",
            "v_lin",
            "out_lin",
            "lin1",
            "lin2",
            "Wqkv",
            "Wo",
            "Wi",
        ),
        head_prefixes=(
            "cls",
            "lm_head",
            "head",
            "decoder",
            "pooler",
            "vocab_",
            "pre_classifier",
            "classifier",
        ),
    ),
    "llada": FamilySpec(
        name="llada",
        mask_tokens=("<|mdm_mask|>",),
        eos_tokens=("<|endoftext|>",),
        bos_tokens=("<|startoftext|>",),
        eot_tokens=("<|eot_id|>",),
        chat_template=LLADA_CHAT_TEMPLATE,
        lora_targets=("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"),
        head_prefixes=("model.transformer.ff_out", "lm_head"),
    ),
    "dream": FamilySpec(
        name="dream",
        mask_tokens=("<|mask|>",),
        eos_tokens=("<|endoftext|>",),
        bos_tokens=("<|beginoftext|>",),
        eot_tokens=("<|im_end|>",),
        chat_template=DREAM_CHAT_TEMPLATE,
        keep_own_template=True,
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        head_prefixes=("lm_head",),
    ),
    "diffusion_gemma": FamilySpec(
        name="diffusion_gemma",
        mask_tokens=(),
        eos_tokens=("<eos>",),
        bos_tokens=("<bos>",),
        eot_tokens=("<turn|>",),
        chat_template=DIFFUSION_GEMMA_CHAT_TEMPLATE,
        keep_own_template=True,
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        head_prefixes=("lm_head",),
        model_class="DiffusionGemmaForBlockDiffusion",
        trains_padding=False,
        # The text stack's attention and dense-MLP projections, named once (the decoder's
        # are the same weights; the router, experts, vision tower and self-conditioning
        # MLP are not targets).
        lora_scope=r"model\.encoder\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+",
        quantization_skip=(
            "lm_head",
            r".*\.router",
            r".*vision_tower",
            r".*embed_vision",
            r".*self_conditioning",
        ),
        kbit_upcast=False,
        hooks="diffusion_gemma",
    ),
    # Causal LMs made bidirectional (models/a2d.py); their own chat template when they have one.
    "a2d": FamilySpec(
        name="a2d",
        mask_tokens=(MASK_TOKEN,),
        added_mask_token=MASK_TOKEN,
        eos_tokens=("<|endoftext|>", "<|end_of_text|>", "</s>"),
        bos_tokens=("<|begin_of_text|>", "<s>"),
        eot_tokens=("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "</s>"),
        chat_template=CHATML_TEMPLATE,
        keep_own_template=True,
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        head_prefixes=("lm_head",),
        loader="a2d:load_pretrained",
    ),
}


def family_model_class(family: str) -> Any:
    """The transformers class that loads this family's checkpoints."""
    import transformers

    from . import register_native_models  # noqa: F401  (native and a2d classes)

    return getattr(transformers, FAMILIES[family].model_class)


def family_hook(family: str, name: str) -> Callable[..., None]:
    """The family's hook `name` (see FamilySpec.hooks), or a no-op when it has none."""
    module = FAMILIES[family].hooks
    hook = (
        getattr(importlib.import_module(f"{__package__}.{module}"), name, None) if module else None
    )
    return hook if hook is not None else (lambda *_args: None)


def read_model_config(model_path: str) -> dict[str, Any]:
    """config.json as a dict, without loading weights or remote code."""
    folder = Path(model_path).expanduser()
    if folder.is_dir():
        local = folder / "config.json"
        if not local.is_file():
            raise ModelError(f"model_name: the folder {model_path!r} has no config.json")
        try:
            config = json.loads(local.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ModelError(f"model_name: {str(local)!r} is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ModelError(f"model_name: {str(local)!r} must hold a JSON object")
        return config
    if looks_like_path(model_path):
        raise ModelError(f"model_name: the folder {model_path!r} does not exist")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_path).to_dict()
    except Exception as e:
        raise ModelError(
            f"model_name {model_path!r} is not a local model folder and its config could not "
            f"be read from the Hugging Face hub ({first_line(e)})"
        ) from None


def detect_family(config: dict[str, Any]) -> str:
    """bert, llada, dream, diffusion_gemma or a2d from `model_type`, then `architectures`;
    unknown ones are an error naming what the config says (a causal LM a2d does not
    convert, by name)."""
    model_type = str(config.get("model_type", "")).lower()
    archs = [str(a) for a in config.get("architectures") or []]
    if model_type == "diffusion_gemma" or "DiffusionGemmaForBlockDiffusion" in archs:
        return "diffusion_gemma"
    if model_type == "llada" or any(a.lower().startswith("llada") for a in archs):
        return "llada"
    if model_type == "dream" or any(a.lower().startswith("dream") for a in archs):
        return "dream"
    if is_a2d_model_type(model_type):
        return "a2d"
    if model_type.startswith(A2D_PREFIX) or any(a.endswith("ForCausalLM") for a in archs):
        raise ModelError(
            f"unsupported model: model_type {config.get('model_type')!r} ({', '.join(archs)}) is a "
            f"causal LM that a2d does not convert; a2d converts {', '.join(SOURCE_MODEL_TYPES)}"
        )
    if model_type in BERT_MODEL_TYPES or any(a.endswith("ForMaskedLM") for a in archs):
        return "bert"
    raise ModelError(
        f"unsupported model: model_type {config.get('model_type')!r}, architectures {archs}; "
        "supported: BERT-family masked LMs (bert, roberta, modernbert, distilbert), LLaDA, Dream, "
        "DiffusionGemma, "
        f"and causal LMs a2d converts ({', '.join(SOURCE_MODEL_TYPES)})"
    )


# model_type -> positions a padding offset takes from max_position_embeddings (RoBERTa
# numbers positions from padding_idx + 1).
_POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2}


def position_limit(config: dict[str, Any], family: str) -> int | None:
    """The longest token sequence the model can take, or None when its config sets none.

    Dream reserves one position for the BOS its trainer may prepend. DiffusionGemma keeps
    its limit in `text_config`.
    """
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    limit = (
        config.get("max_position_embeddings")
        or config.get("max_sequence_length")
        or text.get("max_position_embeddings")
    )
    if not isinstance(limit, int) or limit <= 0:
        return None
    limit -= _POSITION_OFFSET.get(str(config.get("model_type", "")).lower(), 0)
    return limit - 1 if family == "dream" else limit


@dataclass
class TokenIds:
    """The special ids the collators, trainers and samplers need (mask_id None: the
    family has no mask token)."""

    mask_id: int | None
    eos_id: int
    pad_id: int
    bos_id: int | None
    stop_ids: tuple[int, ...]
    tokenizer_size: int | None = None  # len(tokenizer), mask token included


def _find_token(tokenizer: Any, candidates: tuple[str, ...]) -> str | None:
    vocab = tokenizer.get_vocab()
    return next((tok for tok in candidates if tok in vocab), None)


def prepare_tokenizer(tokenizer: Any, family: str, model_config: dict[str, Any]) -> TokenIds:
    """Register mask/eos/pad/bos, install the chat template, pad on the right."""
    spec = FAMILIES[family]
    tokenizer.padding_side = "right"
    if spec.mask_tokens:
        _set_mask_token(tokenizer, spec, model_config)
    if family == "bert":
        if tokenizer.sep_token is None or tokenizer.cls_token is None:
            raise ModelError(
                "this BERT-family tokenizer has no [CLS]/[SEP] tokens to build a chat template from"
            )
        if tokenizer.eos_token is None:
            tokenizer.eos_token = tokenizer.sep_token
    else:
        for attr, names in (("eos_token", spec.eos_tokens), ("bos_token", spec.bos_tokens)):
            if getattr(tokenizer, attr) is None and (tok := _find_token(tokenizer, names)):
                setattr(tokenizer, attr, tok)
        if tokenizer.eos_token is None:
            raise ModelError(
                f"the {family} tokenizer has no end-of-text token (tried {', '.join(spec.eos_tokens)})"
            )
    # Padding is trained as end-of-answer: pad with EOS (LLaDA and Dream share the id anyway).
    if (family != "bert" and spec.trains_padding) or tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not (spec.keep_own_template and tokenizer.chat_template):
        tokenizer.chat_template = spec.chat_template
    eot = _find_token(tokenizer, spec.eot_tokens)
    stop = {tokenizer.eos_token_id} | ({tokenizer.convert_tokens_to_ids(eot)} if eot else set())
    if family == "bert":
        stop.add(tokenizer.sep_token_id)
    return TokenIds(
        mask_id=tokenizer.mask_token_id if spec.mask_tokens else None,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.eos_token_id if spec.trains_padding else tokenizer.pad_token_id,
        bos_id=tokenizer.bos_token_id,
        stop_ids=tuple(sorted(stop)),
        tokenizer_size=len(tokenizer),
    )


def _set_mask_token(tokenizer: Any, spec: FamilySpec, model_config: dict[str, Any]) -> None:
    if tokenizer.mask_token is None:
        token = _find_token(tokenizer, spec.mask_tokens)
        if token is None and model_config.get("mask_token_id") is not None:
            token = tokenizer.convert_ids_to_tokens(int(model_config["mask_token_id"]))
        if token is None and spec.added_mask_token:
            tokenizer.add_special_tokens({"mask_token": spec.added_mask_token})
            return
        if token is None:
            raise ModelError(
                f"the tokenizer has no mask token (looked for {', '.join(spec.mask_tokens)} and the config's "
                "mask_token_id): a masked-diffusion model needs one"
            )
        tokenizer.mask_token = token
    expected = model_config.get("mask_token_id")
    if expected is not None and tokenizer.mask_token_id != int(expected):
        raise ModelError(
            f"the tokenizer's mask token {tokenizer.mask_token!r} has id {tokenizer.mask_token_id}, "
            f"but the model's config says mask_token_id {expected}"
        )


def load_tokenizer(model_path: str, family: str) -> Any:
    """The model's tokenizer without remote code (Dream ships a custom class: read it as Qwen2)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    except Exception as first:
        if family != "dream":
            raise ModelError(f"cannot load the tokenizer of {model_path!r}: {first}") from first
        from transformers import Qwen2Tokenizer

        try:
            return Qwen2Tokenizer.from_pretrained(model_path)
        except Exception as e:
            raise ModelError(f"cannot load the Dream tokenizer of {model_path!r}: {e}") from e


def head_module_names(model: Any) -> set[str]:
    """Names of the output-embedding module (the vocabulary head), possibly under peft."""
    head = model.get_output_embeddings()
    return {name for name, module in model.named_modules() if module is head}


def resolve_lora_targets(
    model: Any, family: str, requested: str, exclude: set[str] = frozenset()
) -> list[str]:
    """Full names of the Linear modules LoRA wraps; an unknown requested name is an error.

    peft silently skips names that match nothing (half-missing LoRA), so every requested
    short name must match at least one module. The vocabulary head and the modules of the
    MLM head are never targets.
    """
    import torch

    spec = FAMILIES[family]
    heads = head_module_names(model) | set(exclude)
    scope = re.compile(spec.lora_scope) if spec.lora_scope else None
    linears = {
        name: name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name not in heads
        and not _under_head(name, spec, heads)
        and (scope is None or scope.fullmatch(name))
    }
    available = sorted(set(linears.values()))
    if requested.strip() in ("", "auto"):
        wanted = [n for n in spec.lora_targets if n in available]
        if not wanted:
            raise ModelError(
                f"no default LoRA target of the {family} family exists in this model; its Linear modules are: {', '.join(available)}"
            )
    else:
        wanted = [n.strip() for n in requested.split(",") if n.strip()]
        missing = [n for n in wanted if n not in available]
        if missing:
            raise ModelError(
                f"lora_target_modules: {', '.join(missing)} match no Linear module of this model; "
                f"the ones that exist are: {', '.join(available)}"
            )
    return sorted(name for name, short in linears.items() if short in wanted)


def _under_head(name: str, spec: FamilySpec, heads: set[str]) -> bool:
    parts = name.split(".")
    prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
    if prefixes & heads:
        return True
    return parts[0] in spec.head_prefixes or any(
        name.startswith(p + ".") for p in spec.head_prefixes if "." in p
    )
