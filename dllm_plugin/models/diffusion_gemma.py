"""DiffusionGemma's model hooks: the frozen router and LoRA adaptors shared by the two
module trees.

transformers builds DiffusionGemmaForBlockDiffusion as two module trees over ONE set of
text-stack weights: `model.encoder.language_model.layers[i]` and `model.decoder.layers[i]`
are different modules whose parameters are the same tensors. peft wraps modules, so an
adaptor on the encoder's q_proj would leave the decoder's q_proj (same weight) without
it, and an adaptor on both would be two independent adaptors that a merge adds twice
into the one weight. The recipe has one adaptor per projection, used by both passes: the
family's LoRA targets are the encoder's modules only (families.py, `lora_scope`), and
`share_adaptors` then puts the very same wrapped module into the decoder.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ..errors import ModelError

logger = logging.getLogger(__name__)

# The first transformers release with everything this trainer uses of the model:
# DiffusionGemma (5.11), `self_conditioning_mask` (5.12), gradient checkpointing (5.15).
MIN_TRANSFORMERS = "5.15.0"


def _text_stacks(model: Any) -> tuple[nn.ModuleList, nn.ModuleList]:
    """(encoder layers, decoder layers) of a DiffusionGemma model, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    core = base.model
    return core.encoder.language_model.layers, core.decoder.layers


def check_environment() -> None:
    """Refuse a transformers release older than the model features this trainer uses
    (before any weight is read)."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise ModelError(
            f"DiffusionGemma needs transformers >= {MIN_TRANSFORMERS} (installed: "
            f"{transformers.__version__}); pip install -U 'transformers>={MIN_TRANSFORMERS}'"
        )


def frozen_modules(model: Any) -> list[nn.Module]:
    """What full fine-tuning leaves untouched: every layer's MoE router (projection, scale
    and per-expert scales), as the recipe freezes it, and the vision tower with its
    projection, which text-only training never runs (DDP needs every trainable weight
    to get a gradient)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoder = base.model.encoder
    routers = [layer.router for layers in _text_stacks(model) for layer in layers]
    return [*routers, encoder.vision_tower, encoder.embed_vision]


def prepare_base(model: Any) -> None:
    """Freeze `frozen_modules`; run right after loading, before any adaptor."""
    frozen = {id(p): p for module in frozen_modules(model) for p in module.parameters()}
    for param in frozen.values():
        param.requires_grad_(False)
    count = sum(p.numel() for p in frozen.values())
    logger.info("frozen: MoE routers and the vision tower (%s parameters)", f"{count:,}")


def share_adaptors(model: Any) -> None:
    """Make each decoder layer use the encoder layer's LoRA-wrapped projections.

    Call after peft wrapped the encoder's modules (a new adaptor, or one reloaded with
    PeftModel.from_pretrained). The base weights are tied, so only the module objects
    change; a projection whose weights are not the same tensors is refused.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    shared = 0
    for encoder_layer, decoder_layer in zip(*_text_stacks(model), strict=True):
        for part in ("self_attn", "mlp"):
            source, target = getattr(encoder_layer, part), getattr(decoder_layer, part)
            for name, wrapped in source.named_children():
                if not isinstance(wrapped, BaseTunerLayer):
                    continue
                current = getattr(target, name)
                if current is wrapped:
                    continue
                if current.weight is not wrapped.get_base_layer().weight:
                    raise ModelError(
                        f"DiffusionGemma: decoder {part}.{name} of layer "
                        f"{encoder_layer.self_attn.layer_idx} does not share the encoder's "
                        "weight (the checkpoint unties them); LoRA cannot be shared"
                    )
                setattr(target, name, wrapped)
                shared += 1
    logger.info("LoRA adaptors shared by the encoder and decoder passes: %d modules", shared)
