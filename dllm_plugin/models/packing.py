"""How each model type takes a packed row: per-example positions, per-example attention.

A packed row lays several examples end to end (segment ids 0, 1, ...; -1 for the filler
after the last). Each example must see only itself (block-diagonal bidirectional
attention) at the positions it would have alone (0, 1, ... from its first token). What
the model needs for that differs by model type; `PACKED_INPUTS` is the table, and a
model type missing from it cannot pack (the job fails before any weight is loaded).

- LLaDA, Dream (native, RoPE): `position_ids` restarting at 0 and the `segment_ids`
  themselves: their attention builds the block-diagonal SDPA mask, or on CUDA runs
  torch's variable-length kernel over the examples (models/llada.py packed_attention).
- BERT, DistilBERT (learned absolute positions): `position_ids` restarting at 0 and the
  4-D mask transformers builds for the model's attention implementation (SDPA, eager,
  ...) with the same-example rule as an extra condition.
- RoBERTa and its kin: the same, with positions numbered from padding_idx + 1 as
  RoBERTa itself numbers them.
- ModernBERT (RoPE, alternating global and sliding-window layers): restarting
  `position_ids` and one mask per layer kind, both limited to the example.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import ModelError


def segment_positions(segment_ids: Tensor) -> Tensor:
    """[b, L] position of each token inside its example (0 at every example start)."""
    length = segment_ids.shape[1]
    index = torch.arange(length, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    run_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - run_start


def _native(config: Any, segment_ids: Tensor) -> dict[str, Any]:
    return {"position_ids": segment_positions(segment_ids), "segment_ids": segment_ids}


def _hf_mask(config: Any, segment_ids: Tensor, builder: Callable | None = None) -> Any:
    """The 4-D mask transformers' own builder makes for this model, limited to examples."""
    from transformers import masking_utils

    builder = builder or masking_utils.create_bidirectional_mask
    shape_like = torch.empty(*segment_ids.shape, 1, dtype=_dtype(config), device=segment_ids.device)
    return builder(
        config=config,
        inputs_embeds=shape_like,
        attention_mask=None,
        and_mask_function=masking_utils.packed_sequence_mask_function(segment_ids),
    )


def _dtype(config: Any) -> torch.dtype:
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _absolute(config: Any, segment_ids: Tensor) -> dict[str, Any]:
    return {
        "position_ids": segment_positions(segment_ids),
        "attention_mask": _hf_mask(config, segment_ids),
    }


def _roberta(config: Any, segment_ids: Tensor) -> dict[str, Any]:
    offset = int(config.pad_token_id) + 1  # RoBERTa numbers real tokens from padding_idx + 1
    return {
        "position_ids": segment_positions(segment_ids) + offset,
        "attention_mask": _hf_mask(config, segment_ids),
    }


def _modernbert(config: Any, segment_ids: Tensor) -> dict[str, Any]:
    from transformers import masking_utils

    sliding = masking_utils.create_bidirectional_sliding_window_mask
    return {
        "position_ids": segment_positions(segment_ids),
        "attention_mask": {
            "full_attention": _hf_mask(config, segment_ids),
            "sliding_attention": _hf_mask(config, segment_ids, sliding),
        },
    }


PackedInputs = Callable[[Any, Tensor], dict[str, Any]]
PACKED_INPUTS: dict[str, PackedInputs] = {
    "llada": _native,
    "dream": _native,
    "bert": _absolute,
    "distilbert": _absolute,
    "roberta": _roberta,
    "xlm-roberta": _roberta,
    "camembert": _roberta,
    "modernbert": _modernbert,
}


def packed_inputs_for(model_config: Mapping[str, Any] | Any) -> PackedInputs:
    """The table entry for this model's type; ModelError when it cannot pack."""
    if isinstance(model_config, Mapping):
        model_type = str(model_config.get("model_type", "")).lower()
    else:
        model_type = str(getattr(model_config, "model_type", "")).lower()
    if model_type not in PACKED_INPUTS:
        supported = ", ".join(sorted(PACKED_INPUTS))
        raise ModelError(
            f"packing: model type {model_type!r} has no per-example attention here "
            f"(packing supports {supported}); set packing to false"
        )
    return PACKED_INPUTS[model_type]
