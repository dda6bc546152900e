"""Native LLaDA (GSAI-ML/LLaDA-8B-*) for transformers 5.x.

Why this exists: the checkpoints ship OLMo-derived remote code that no longer loads on
transformers 5 (and runs arbitrary code from the model folder). This module rebuilds the
same network from the published architecture so the official weights load through the
Auto classes with no ``trust_remote_code``. State-dict keys are exactly the official ones
(``model.transformer.wte.weight``, ``model.transformer.blocks.{i}.q_proj.weight``, ...).

It also holds the small numeric primitives (RMSNorm, RoPE, bidirectional SDPA, padding
masks) shared with :mod:`dllm_plugin.models.dream`, so both models round and mask the
same way.

Interface kept deliberately simple for the diffusion trainer:
- ``forward`` returns raw logits (no shift, ``logits[:, i]`` scores token ``i``), never a
  loss;
- the LM head is the ``nn.Linear`` at ``model.transformer.ff_out`` (also returned by
  ``get_output_embeddings()``) and is looked up by attribute on every call, so swapping it
  for ``nn.Identity`` makes ``logits`` the final normed hidden states.
"""

import dataclasses
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MaskedLMOutput

logger = logging.getLogger(__name__)

__all__ = [
    "AttentionMask",
    "LLaDABlock",
    "LLaDAConfig",
    "LLaDAModel",
    "LLaDAModelLM",
    "LLaDARMSNorm",
    "apply_rope",
    "as_positions",
    "bidirectional_attention",
    "cached_keys_values",
    "packed_attention",
    "prepare_attention_mask",
    "rms_normalize",
    "rope_cos_sin",
]


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


class LLaDAConfig(PretrainedConfig):
    """Configuration with the official OLMo-style field names of the LLaDA checkpoints.

    Defaults are those of LLaDA-8B so that ``LLaDAConfig()`` describes a model this module
    can build. Fields present in the official ``config.json`` but irrelevant to the forward
    pass (``init_device``, ``precision``, ``flash_attention``, ...) are kept so a saved
    config stays a drop-in official one; unknown extra keys (``auto_map`` included) are kept
    as plain attributes. Standard transformers names (``hidden_size``,
    ``num_attention_heads``, ``tie_word_embeddings``, ...) are aliases of the OLMo fields.
    """

    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "num_hidden_layers": "n_layers",
        "intermediate_size": "mlp_hidden_size",
        "max_position_embeddings": "max_sequence_length",
        "tie_word_embeddings": "weight_tying",
        "initializer_range": "init_std",
    }

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = 32
    n_layers: int = 32
    mlp_ratio: int = 4
    mlp_hidden_size: int | None = 12288
    activation_type: str = "silu"
    block_type: str = "llama"
    block_group_size: int = 1
    alibi: bool = False
    alibi_bias_max: float = 8.0
    rope: bool = True
    rope_full_precision: bool = True
    rope_theta: float = 500000.0
    flash_attention: bool = False
    attention_dropout: float = 0.0
    multi_query_attention: bool | None = None
    attention_layer_norm: bool = False
    attention_layer_norm_with_affine: bool = True
    residual_dropout: float = 0.0
    embedding_dropout: float = 0.0
    input_emb_norm: bool = False
    layer_norm_type: str = "rms"
    layer_norm_with_affine: bool = True
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    include_qkv_bias: bool | None = False
    include_bias: bool = False
    bias_for_layer_norm: bool | None = False
    scale_logits: bool = False
    vocab_size: int = 126464
    embedding_size: int | None = 126464
    weight_tying: bool = False
    eos_token_id: int | None = 126081
    pad_token_id: int | None = 126081
    bos_token_id: int | None = None
    mask_token_id: int | None = 126336
    init_device: str | None = "meta"
    init_fn: str = "mitchell"
    init_std: float = 0.02
    init_cutoff_factor: float | None = None
    precision: str | None = "amp_bf16"
    use_cache: bool = False

    @property
    def effective_n_kv_heads(self) -> int:
        """Key/value head count as the official code resolves it (``None`` = MHA or MQA)."""
        if self.n_kv_heads is not None:
            return self.n_kv_heads
        return 1 if self.multi_query_attention else self.n_heads

    @property
    def attention_head_dim(self) -> int:
        """Per-head width; LLaDA always derives it from ``d_model / n_heads``.

        Not called ``head_dim`` so that a config.json carrying such a key still loads.
        """
        return self.d_model // self.n_heads

    @property
    def ffn_hidden_size(self) -> int:
        """Width of the gated MLP (``mlp_hidden_size`` or ``mlp_ratio * d_model``)."""
        return self.mlp_hidden_size or self.mlp_ratio * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the LM head (``embedding_size`` or ``vocab_size``)."""
        return self.embedding_size or self.vocab_size


def _unsupported(field: str, value: Any, expected: str) -> ValueError:
    return ValueError(
        f"LLaDAConfig.{field}={value!r} is not supported by the native LLaDA implementation "
        f"(expected {expected})."
    )


def check_llada_config(config: LLaDAConfig) -> None:
    """Refuse, naming the field, every config variant whose forward is not implemented.

    Silently running a different architecture would load weights into the wrong maths.
    """
    expected_values = {
        "block_type": ("llama", '"llama"'),
        "activation_type": ("silu", '"silu"'),
        "layer_norm_type": ("rms", '"rms"'),
        "alibi": (False, "false"),
        "rope": (True, "true"),
        "attention_layer_norm": (False, "false"),
        "input_emb_norm": (False, "false"),
        "scale_logits": (False, "false"),
        "block_group_size": (1, "1"),
        "layer_norm_with_affine": (True, "true"),
    }
    for field, (wanted, text) in expected_values.items():
        value = getattr(config, field, wanted)
        if value != wanted:
            raise _unsupported(field, value, text)
    if getattr(config, "clip_qkv", None) is not None:
        raise _unsupported("clip_qkv", config.clip_qkv, "null")
    if config.d_model % config.n_heads:
        raise _unsupported("n_heads", config.n_heads, f"a divisor of d_model={config.d_model}")
    if config.n_heads % config.effective_n_kv_heads:
        raise _unsupported(
            "n_kv_heads", config.n_kv_heads, f"a divisor of n_heads={config.n_heads}"
        )
    if config.attention_head_dim % 2:
        raise _unsupported("n_heads", config.n_heads, "an even head_dim for RoPE")


def _norm_has_bias(config: LLaDAConfig) -> bool:
    """OLMo rule: ``bias_for_layer_norm`` if set, else ``include_bias``."""
    if config.bias_for_layer_norm is None:
        return bool(config.include_bias)
    return bool(config.bias_for_layer_norm)


# --------------------------------------------------------------------------------------
# Shared numeric primitives (also used by dream.py)
# --------------------------------------------------------------------------------------


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalise in fp32 (autocast off) and cast back, as both official models do.

    The affine scale is applied by the caller *after* the cast, as in both references;
    scaling before the cast would round differently in bf16.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return x32.to(x.dtype)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 RoPE tables for rotate-halves layout, shape ``[B or 1, 1, L, head_dim]``.

    ``inv_freq`` is recomputed here on every call instead of living in a buffer: it is tiny,
    and a buffer risks being left uninitialised when transformers 5 builds the model on the
    meta device and loads a checkpoint that (officially) does not contain it.
    """
    device = position_ids.device
    with torch.autocast(device_type=device.type, enabled=False):
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
        inv_freq = 1.0 / (theta**exponents)
        angles = position_ids.float()[..., None] * inv_freq
        angles = torch.cat((angles, angles), dim=-1)[:, None, :, :]
        return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, compute_dtype: torch.dtype
) -> torch.Tensor:
    """Rotate ``x`` ([B, H, L, D]) in ``compute_dtype`` and return it in ``x``'s dtype.

    LLaDA passes fp32 (its ``rope_full_precision``); Dream passes the promoted dtype of q
    and its tables (the activation dtype unless autocast is on), so the rounding of each
    reference is reproduced.
    """
    xc = x.to(compute_dtype)
    cos, sin = cos.to(compute_dtype), sin.to(compute_dtype)
    return (xc * cos + _rotate_half(xc) * sin).to(x.dtype)


@dataclasses.dataclass
class AttentionMask:
    """What the attention layers need from a user ``attention_mask``.

    ``keys``: bool mask for SDPA (True = may attend), broadcastable to [B, H, L, L]; rows
    that would be fully masked are opened up so no backend can produce NaN.
    ``queries``: [B, 1 or H, L, 1] multiplier that zeroes the attention output of fully masked
    query rows, i.e. the result torch's CPU SDPA gives for such rows, on every backend.
    """

    keys: torch.Tensor | None
    queries: torch.Tensor | None
    # Packed rows: (cu_seqlens int32 [n + 1], longest run) of the runs of equal segment
    # ids over the flattened batch, for a variable-length kernel (see packed_attention).
    runs: tuple[torch.Tensor, int] | None = None
    _additive: dict[torch.dtype, torch.Tensor] = dataclasses.field(default_factory=dict, repr=False)

    def for_sdpa(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``keys`` as SDPA's additive mask (0 / -inf) in ``dtype``, made once per forward.

        Every layer gets the same tensor: SDPA would otherwise convert a bool mask into a
        float copy in each layer and keep each copy for the backward (16 MiB per layer
        for 4 rows of 1024 tokens).
        """
        if self.keys is None:
            return None
        if dtype not in self._additive:
            additive = torch.zeros(self.keys.shape, dtype=dtype, device=self.keys.device)
            self._additive[dtype] = additive.masked_fill_(~self.keys, float("-inf"))
        return self._additive[dtype]


def _from_key_padding(keep: torch.Tensor, mask_pad_queries: bool) -> AttentionMask:
    """2-D [B, L] padding mask: pad keys masked; pad query rows optionally zeroed."""
    has_real = keep.any(dim=-1)[:, None, None, None]
    keys = keep[:, None, None, :] | ~has_real
    queries = keep[:, None, :, None] if mask_pad_queries else None
    return AttentionMask(keys=keys, queries=queries)


def _from_full_mask(keep: torch.Tensor) -> AttentionMask:
    """3-D [B, L, L] or 4-D [B, 1|H, L, L] keep-mask (nonzero = may attend)."""
    if keep.dim() == 3:
        keep = keep[:, None]
    row_open = keep.any(dim=-1, keepdim=True)
    if bool(row_open.all()):  # e.g. packed rows: every query sees its own example
        return AttentionMask(keys=keep, queries=None)
    return AttentionMask(keys=keep | ~row_open, queries=row_open)


def run_blocks(
    blocks: nn.ModuleList,
    final_norm: nn.Module,
    x: torch.Tensor,
    output_hidden_states: bool | None,
    **block_kwargs: Any,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """The block stack and final norm; hidden states are each block's input plus the output."""
    states: list[torch.Tensor] = []
    for block in blocks:
        if output_hidden_states:
            states.append(x)
        x = block(x, **block_kwargs)
    x = final_norm(x)
    if output_hidden_states:
        states.append(x)
    return x, (tuple(states) if output_hidden_states else None)


def prepare_attention_mask(
    attention_mask: torch.Tensor | None, mask_pad_queries: bool, cache: Any = None
) -> AttentionMask | None:
    """Turn a user mask into SDPA inputs; ``None`` when nothing is masked.

    With a key/value cache the new tokens see every cached token and each other: a mask
    is refused there (the block sampler never needs one).

    Accepts the HF 2-D padding mask (1 = real token, 0 = pad) or a 3-D/4-D keep-mask in the
    dllm convention (nonzero = may attend; additive float masks are NOT supported). A mask
    without zeros is dropped so the fast unmasked SDPA kernels can run.
    """
    if attention_mask is None:
        return None
    if cache is not None:
        raise ValueError("attention_mask with a key/value cache is not supported")
    if attention_mask.is_floating_point() and bool((attention_mask < 0).any()):
        raise ValueError(
            "attention_mask looks additive (negative values); pass a keep-mask "
            "(1/True = attend, 0/False = masked) instead"
        )
    keep = attention_mask != 0
    if bool(keep.all()):
        return None
    if keep.dim() == 2:
        return _from_key_padding(keep, mask_pad_queries)
    if keep.dim() in (3, 4):
        return _from_full_mask(keep)
    raise ValueError(f"attention_mask must be 2-D, 3-D or 4-D, got shape {tuple(keep.shape)}")


def packed_attention(segment_ids: torch.Tensor) -> AttentionMask:
    """Per-example attention for packed rows [B, L]: a token sees its own segment only.

    SDPA gets the block-diagonal keep-mask; on CUDA, with torch's variable-length flash
    kernel available, the runs of equal segment ids (filler included) go to that kernel
    instead, which computes no attention across examples at all.
    """
    keep = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    flat = segment_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[:: segment_ids.shape[1]] = True  # every row starts a run
    bounds = torch.cat([starts.nonzero().squeeze(-1), flat.new_tensor([flat.numel()])])
    cu_seqlens = bounds.to(torch.int32)
    return AttentionMask(keys=keep, queries=None, runs=(cu_seqlens, int(bounds.diff().max())))


_VARLEN_VERDICT: dict[tuple[str, torch.dtype], bool] = {}


def _varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: tuple[torch.Tensor, int]
) -> torch.Tensor:
    """torch's variable-length flash attention over the runs; returns [B, L, H * D]."""
    from torch.nn.attention.varlen import varlen_attn

    batch, heads, length, dim = q.shape
    cu_seqlens, longest = runs

    def tokens(x: torch.Tensor) -> torch.Tensor:  # [B, h, L, D] -> [B * L, h, D]
        return x.transpose(1, 2).reshape(batch * length, x.shape[1], dim)

    out = varlen_attn(
        tokens(q), tokens(k), tokens(v), cu_seqlens, cu_seqlens, longest, longest,
        enable_gqa=k.shape[1] != heads,
    )  # fmt: skip
    return out.reshape(batch, length, heads * dim)


def _varlen_usable(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, dropout_p: float
) -> bool:
    """Whether the variable-length kernel may run here: CUDA, half precision, no dropout,
    the kernel present, and a one-off check on these very inputs (per device and dtype)
    that it gives what masked SDPA gives; otherwise SDPA runs, with one log line."""
    if mask.runs is None or not q.is_cuda or dropout_p > 0:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False
    key = (str(q.device), q.dtype)
    if key not in _VARLEN_VERDICT:
        _VARLEN_VERDICT[key] = _check_varlen(q, k, v, mask)
    return _VARLEN_VERDICT[key]


def _check_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> bool:
    try:
        with torch.no_grad():
            fast = _varlen_attention(q, k, v, mask.runs)
            slow = bidirectional_attention(q, k, v, dataclasses.replace(mask, runs=None), 0.0)
        ok = torch.allclose(fast.float(), slow.float(), rtol=2e-2, atol=2e-2)
        reason = "" if ok else "its output differs from masked SDPA"
    except Exception as e:  # no kernel in this build, unsupported GPU or head size
        ok, reason = False, f"{type(e).__name__}: {e}"
    if not ok:
        logger.warning("packed attention: the variable-length kernel is not used (%s)", reason)
    return ok


def attention_for(
    attention_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    mask_pad_queries: bool,
    cache: Any = None,
) -> AttentionMask | None:
    """The attention of a forward: per example for packed rows, else from the user mask."""
    if segment_ids is None:
        return prepare_attention_mask(attention_mask, mask_pad_queries, cache)
    if attention_mask is not None or cache is not None:
        raise ValueError("segment_ids (packed rows) take no attention_mask and no cache")
    return packed_attention(segment_ids)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, Hkv * n_rep, L, D]; query head h reads kv head h // n_rep."""
    if n_rep == 1:
        return x
    batch, kv_heads, length, dim = x.shape
    x = x[:, :, None].expand(batch, kv_heads, n_rep, length, dim)
    return x.reshape(batch, kv_heads * n_rep, length, dim)


def bidirectional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask | None,
    dropout_p: float,
) -> torch.Tensor:
    """Full (never causal) SDPA with GQA; returns [B, L, H * D].

    Masked diffusion models see the whole sequence, so ``is_causal`` is always False; the
    scale is SDPA's default ``1 / sqrt(head_dim)``. Packed rows may take the
    variable-length kernel (``packed_attention``).
    """
    if mask is not None and _varlen_usable(q, k, v, mask, dropout_p):
        return _varlen_attention(q, k, v, mask.runs)
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    attn_mask = None if mask is None else mask.for_sdpa(q.dtype)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=False
    )
    if mask is not None and mask.queries is not None:
        out = out * mask.queries.to(out.dtype)
    batch, heads, length, dim = out.shape
    return out.transpose(1, 2).reshape(batch, length, heads * dim)


def cached_keys_values(
    cache: Any, k: torch.Tensor, v: torch.Tensor, layer_idx: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values to attend to: with a transformers ``Cache`` the cached prefix's followed
    by these (which the cache keeps); without one, these.

    Only the block sampler passes a cache: it appends each committed block and crops the
    keys/values of a block it is still denoising (block_sampler.py).
    """
    if cache is None:
        return k, v
    return cache.update(k, v, layer_idx)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, heads * D] -> [B, heads, L, D]."""
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def as_positions(
    position_ids: torch.Tensor | None, x: torch.Tensor, cache: Any = None
) -> torch.Tensor:
    """[B or 1, L] positions for ``x`` [B, L, d]; default 0..L-1 (after a cache: after the
    cached tokens).

    Both references place tokens at 0..L-1 regardless of padding, so that is the default.
    """
    if position_ids is None:
        start = cache.get_seq_length() if cache is not None else 0
        return torch.arange(start, start + x.shape[1], device=x.device)[None, :]
    position_ids = position_ids.to(x.device)
    return position_ids[None, :] if position_ids.dim() == 1 else position_ids


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


class LLaDARMSNorm(nn.Module):
    """OLMo ``RMSLayerNorm``: fp32 normalisation, cast back, then ``weight * x (+ bias)``."""

    def __init__(self, size: int, eps: float, bias: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.weight * rms_normalize(x, self.eps)
        return out if self.bias is None else out + self.bias


class LLaDABlock(GradientCheckpointingLayer):
    """Pre-norm Llama-style block with the official attribute names.

    ``ff_proj`` is the gate (SiLU applies to it), ``up_proj`` the linear branch and
    ``ff_out`` the down projection.
    """

    def __init__(self, config: LLaDAConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # this block's slot in a key/value cache
        d, hd, ffn = config.d_model, config.attention_head_dim, config.ffn_hidden_size
        qkv_bias = bool(config.include_bias or config.include_qkv_bias)
        bias, norm_bias = bool(config.include_bias), _norm_has_bias(config)
        self.n_heads, self.n_kv_heads = config.n_heads, config.effective_n_kv_heads
        self.rope_full_precision = config.rope_full_precision
        self.attention_dropout = config.attention_dropout
        self.residual_dropout = config.residual_dropout
        self.attn_norm = LLaDARMSNorm(d, config.rms_norm_eps, norm_bias)
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=bias)
        self.ff_norm = LLaDARMSNorm(d, config.rms_norm_eps, norm_bias)
        self.ff_proj = nn.Linear(d, ffn, bias=bias)
        self.up_proj = nn.Linear(d, ffn, bias=bias)
        self.ff_out = nn.Linear(ffn, d, bias=bias)

    def _attention(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask | None,
        cache: Any = None,
    ) -> torch.Tensor:
        q = split_heads(self.q_proj(x), self.n_heads)
        k = split_heads(self.k_proj(x), self.n_kv_heads)
        v = split_heads(self.v_proj(x), self.n_kv_heads)
        rope_dtype = torch.float32 if self.rope_full_precision else q.dtype
        q, k = apply_rope(q, cos, sin, rope_dtype), apply_rope(k, cos, sin, rope_dtype)
        k, v = cached_keys_values(cache, k, v, self.layer_idx)
        dropout = self.attention_dropout if self.training else 0.0
        return self.attn_out(bidirectional_attention(q, k, v, mask, dropout))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff_out(F.silu(self.ff_proj(x)) * self.up_proj(x))

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
        mask: AttentionMask | None = None,
        cache: Any = None,
    ) -> torch.Tensor:
        """``hidden`` must stay positional: checkpointing only replays positional inputs."""
        p = self.residual_dropout if self.training else 0.0
        attended = self._attention(self.attn_norm(hidden), cos, sin, mask, cache)
        hidden = hidden + F.dropout(attended, p)
        return hidden + F.dropout(self._mlp(self.ff_norm(hidden)), p)


class LLaDATransformer(nn.Module):
    """Holds the parameters under the official ``transformer.*`` names."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(config, i) for i in range(config.n_layers))
        self.ln_f = LLaDARMSNorm(config.d_model, config.rms_norm_eps, _norm_has_bias(config))
        # With weight_tying this Linear shares wte's weight (tied by transformers), so the
        # trainer always finds an nn.Linear head and checkpoints keep the official keys.
        self.ff_out = nn.Linear(config.d_model, config.padded_vocab_size, bias=config.include_bias)


class LLaDAModel(nn.Module):
    """Backbone: embeddings -> blocks -> ``ln_f``; the LM head is applied by the wrapper."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = LLaDATransformer(config)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        output_hidden_states: bool,
        segment_ids: torch.Tensor | None = None,
        cache: Any = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Return the final normed hidden states and, optionally, every block's input."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        tr = self.transformer
        x = tr.wte(input_ids) if inputs_embeds is None else inputs_embeds
        x = F.dropout(x, self.config.embedding_dropout, self.training)
        positions = as_positions(position_ids, x, cache)
        cos, sin = rope_cos_sin(positions, self.config.attention_head_dim, self.config.rope_theta)
        mask = attention_for(attention_mask, segment_ids, mask_pad_queries=False, cache=cache)
        return run_blocks(
            tr.blocks, tr.ln_f, x, output_hidden_states, cos=cos, sin=sin, mask=mask, cache=cache
        )


class LLaDAModelLM(PreTrainedModel):
    """LLaDA masked-diffusion LM with the official checkpoint layout.

    ``forward`` returns ``MaskedLMOutput(logits, hidden_states)``; ``logits[:, i]`` scores
    the token at position ``i`` (no shift). The head is ``self.model.transformer.ff_out``.
    """

    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["LLaDABlock"]
    _tied_weights_keys = {"model.transformer.ff_out.weight": "model.transformer.wte.weight"}
    accepts_loss_kwargs = False

    def __init__(self, config: LLaDAConfig) -> None:
        check_llada_config(config)
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, init_std) matrices, zero biases, unit norms (the OLMo "normal" init).

        Only used for freshly built models and for weights missing from a checkpoint.
        """
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, (nn.Linear, LLaDARMSNorm)) and module.bias is not None:
            init.zeros_(module.bias)
        if isinstance(module, LLaDARMSNorm):
            init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Module:
        return self.model.transformer.ff_out

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.model.transformer.ff_out = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        segment_ids: torch.LongTensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> MaskedLMOutput | tuple:
        """Bidirectional forward; positions default to 0..L-1 as in the official code
        (``position_ids`` is an extension with the same meaning as Dream's).
        ``segment_ids`` [B, L] (extension, packed rows): a token attends only to tokens
        with its own id (models/packing.py passes them with restarting positions).
        ``cache`` (a transformers ``DynamicCache``, an extension for the block sampler)
        holds earlier tokens' keys and values: the new tokens attend to them and are appended.

        ``attention_mask`` [B, L] (1 = real, 0 = pad) masks pad *keys* only, like dllm's
        copy (the upstream code ignores it); 3-D/4-D keep-masks (nonzero = may attend) are
        accepted too. Extra kwargs (``labels``,
        ``num_items_in_batch``, ``use_cache``, ...) are accepted and ignored: the diffusion
        trainer computes its own loss, so no loss is ever returned.
        """
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        hidden, states = self.model(
            input_ids, inputs_embeds, attention_mask, position_ids, output_hidden_states,
            segment_ids, cache,
        )  # fmt: skip
        logits = self.model.transformer.ff_out(hidden)
        if return_dict is None:
            return_dict = self.config.return_dict
        if not return_dict:
            return (logits, states) if output_hidden_states else (logits,)
        return MaskedLMOutput(logits=logits, hidden_states=states)
