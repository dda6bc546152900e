"""Native Dream (Dream-org/Dream-v0-*-7B) for transformers 5.x.

Why this exists: Dream's remote code fails on transformers 5 (rope init ``KeyError``,
broken ``save_pretrained``, RoPE buffers left uninitialised after ``from_pretrained`` =
silently wrong logits). This is the same Qwen2-shaped bidirectional network, written
from the published architecture, registered under the checkpoints' own ``model_type``
("Dream") so the official weights load with no remote code. Keys are exactly the official
Qwen2 ones; there are no RoPE buffers at all (the tables are computed in ``forward``).

Interface kept deliberately simple for the diffusion trainer:
- ``forward`` returns RAW logits: Dream was initialised from an autoregressive model, so
  ``logits[:, i]`` scores token ``i + 1``; consumers right-shift
  (``cat([logits[:, :1], logits[:, :-1]], 1)``). The model itself never shifts.
- the LM head is the ``nn.Linear`` ``self.lm_head`` (also ``get_output_embeddings()``),
  looked up on every call so that swapping it for ``nn.Identity`` yields the final normed
  hidden states.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MaskedLMOutput

from .llada import (
    AttentionMask,
    apply_rope,
    as_positions,
    attention_for,
    bidirectional_attention,
    cached_keys_values,
    rms_normalize,
    rope_cos_sin,
    run_blocks,
    split_heads,
)

__all__ = ["DreamConfig", "DreamDecoderLayer", "DreamModel", "DreamRMSNorm"]


class DreamConfig(PretrainedConfig):
    """Qwen2-named configuration of the Dream checkpoints (``model_type`` "Dream").

    Defaults are Dream-v0-7B's. Unknown extra keys (``auto_map`` included) are kept as
    plain attributes so a saved config stays close to the official one.
    """

    model_type = "Dream"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int | None = 4
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = 1000000.0
    rope_scaling: dict | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    attention_dropout: float = 0.0
    mask_token_id: int | None = 151666
    pad_token_id: int | None = 151643
    bos_token_id: int | None = 151665
    eos_token_id: int | None = 151643

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)

    @property
    def attention_head_dim(self) -> int:
        """Per-head width; Dream derives it from ``hidden_size / num_attention_heads``.

        Not called ``head_dim`` so that a config.json carrying such a key still loads (and
        is then checked against this value).
        """
        return self.hidden_size // self.num_attention_heads


def _unsupported(field: str, value: Any, expected: str) -> ValueError:
    return ValueError(
        f"DreamConfig.{field}={value!r} is not supported by the native Dream implementation "
        f"(expected {expected})."
    )


def check_dream_config(config: DreamConfig) -> None:
    """Refuse, naming the field, every config variant whose forward is not implemented."""
    if config.hidden_act != "silu":
        raise _unsupported("hidden_act", config.hidden_act, '"silu"')
    if config.rope_scaling:
        raise _unsupported("rope_scaling", config.rope_scaling, "null (plain RoPE)")
    if config.use_sliding_window:
        raise _unsupported("use_sliding_window", True, "false")
    if config.hidden_size % config.num_attention_heads:
        raise _unsupported(
            "num_attention_heads", config.num_attention_heads, "a divisor of hidden_size"
        )
    if config.num_attention_heads % config.num_key_value_heads:
        raise _unsupported(
            "num_key_value_heads", config.num_key_value_heads, "a divisor of num_attention_heads"
        )
    explicit_head_dim = getattr(config, "head_dim", None)
    if explicit_head_dim is not None and explicit_head_dim != config.attention_head_dim:
        raise _unsupported(
            "head_dim",
            explicit_head_dim,
            f"hidden_size / num_attention_heads = {config.attention_head_dim}",
        )
    if config.attention_head_dim % 2:
        raise _unsupported(
            "num_attention_heads", config.num_attention_heads, "an even head_dim for RoPE"
        )


class DreamRMSNorm(nn.Module):
    """Qwen2 RMSNorm: fp32 normalisation, cast back, then ``weight * x``."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.variance_epsilon = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms_normalize(x, self.variance_epsilon)


class DreamAttention(nn.Module):
    """Bidirectional GQA attention; q/k/v carry biases, o_proj does not."""

    def __init__(self, config: DreamConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # this layer's slot in a key/value cache
        d, hd = config.hidden_size, config.attention_head_dim
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.attention_dropout = config.attention_dropout
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=True)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask | None,
        cache: Any = None,
    ) -> torch.Tensor:
        """Rotate in the promoted dtype of q/k and the tables, like the reference.

        ``cos``/``sin`` come in the residual-stream dtype, so without autocast this is the
        activation dtype; under autocast the rotation runs in fp32 and q/k return to the
        dtype of v so SDPA sees one dtype.
        """
        q = split_heads(self.q_proj(x), self.n_heads)
        k = split_heads(self.k_proj(x), self.n_kv_heads)
        v = split_heads(self.v_proj(x), self.n_kv_heads)
        rope_dtype = torch.promote_types(q.dtype, cos.dtype)
        q, k = apply_rope(q, cos, sin, rope_dtype), apply_rope(k, cos, sin, rope_dtype)
        k, v = cached_keys_values(cache, k, v, self.layer_idx)
        dropout = self.attention_dropout if self.training else 0.0
        return self.o_proj(bidirectional_attention(q, k, v, mask, dropout))


class DreamMLP(nn.Module):
    """SwiGLU MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        d, ffn = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block with the official Qwen2 attribute names."""

    def __init__(self, config: DreamConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.input_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DreamAttention(config, layer_idx)
        self.post_attention_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DreamMLP(config)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
        mask: AttentionMask | None = None,
        cache: Any = None,
    ) -> torch.Tensor:
        """``hidden`` must stay positional: checkpointing only replays positional inputs."""
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, mask, cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DreamBaseModel(nn.Module):
    """Backbone: ``embed_tokens`` -> layers -> ``norm`` (the head lives on the wrapper)."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.config = config
        # padding_idx as in the official model: the pad row gets no gradient.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)

    def _rope(
        self, x: torch.Tensor, position_ids: torch.Tensor | None, cache: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 tables cast to the activation dtype, as the reference does before rotating."""
        positions = as_positions(position_ids, x, cache)
        cos, sin = rope_cos_sin(positions, self.config.attention_head_dim, self.config.rope_theta)
        return cos.to(x.dtype), sin.to(x.dtype)

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
        """Return the final normed hidden states and, optionally, every layer's input."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self._rope(x, position_ids, cache)
        mask = attention_for(attention_mask, segment_ids, mask_pad_queries=True, cache=cache)
        return run_blocks(
            self.layers, self.norm, x, output_hidden_states,
            cos=cos, sin=sin, mask=mask, cache=cache,
        )  # fmt: skip


class DreamModel(PreTrainedModel):
    """Dream masked-diffusion LM with the official checkpoint layout.

    ``forward`` returns ``MaskedLMOutput(logits, hidden_states)`` with raw, unshifted
    logits (position ``i`` scores token ``i + 1``). The head is ``self.lm_head``.
    """

    config_class = DreamConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["DreamDecoderLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    accepts_loss_kwargs = False

    def __init__(self, config: DreamConfig) -> None:
        check_dream_config(config)
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) matrices, zero biases and pad row, unit norms.

        Only used for freshly built models and for weights missing from a checkpoint.
        """
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            init.zeros_(module.bias)
        # Slicing drops the "already loaded" flag, so check it on the full weight.
        if (
            isinstance(module, nn.Embedding)
            and module.padding_idx is not None
            and not getattr(module.weight, "_is_hf_initialized", False)
        ):
            init.zeros_(module.weight[module.padding_idx])
        if isinstance(module, DreamRMSNorm):
            init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

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
        """Bidirectional forward; positions default to 0..L-1 (padding is not skipped).
        ``segment_ids`` [B, L] (extension, packed rows): a token attends only to tokens
        with its own id. ``cache`` (a transformers ``DynamicCache``, for the block sampler)
        holds earlier tokens' keys and values: the new tokens attend to them and are appended.

        A 2-D ``attention_mask`` [B, L] (1 = real, 0 = pad) masks pad keys and zeroes the
        attention output of pad queries, exactly what dllm's [B, 1, L, L] bool mask gives;
        3-D/4-D keep-masks (nonzero = may attend) are accepted as in Dream's sampler. Extra
        kwargs (``labels``, ``num_items_in_batch``, ``use_cache``, ...) are ignored: no loss
        is ever computed here.
        """
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        hidden, states = self.model(
            input_ids, inputs_embeds, attention_mask, position_ids, output_hidden_states,
            segment_ids, cache,
        )  # fmt: skip
        logits = self.lm_head(hidden)
        if return_dict is None:
            return_dict = self.config.return_dict
        if not return_dict:
            return (logits, states) if output_hidden_states else (logits,)
        return MaskedLMOutput(logits=logits, hidden_states=states)
