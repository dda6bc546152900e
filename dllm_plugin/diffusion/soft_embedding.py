"""DiffusionGemma's self-conditioning input, computed chunk by chunk from hidden states.

The decoder turns the previous pass's logits into "soft embeddings":
softmax(cap * tanh(W_head h / cap)) @ E * scale, with E its (tied) input embedding.
Handing it those logits costs [n, V] fp32 (1 MiB per canvas position at V = 262144),
plus the softmax of the same size, plus, when E trains, a copy of the probabilities
kept for backward. Here the same vectors come from the pass-1 hidden states, one chunk
of rows at a time: no [n, V] tensor exists, and backward recomputes each chunk's
probabilities. As in the model (and the recipe), pass 1 runs without gradients, so
the only gradient is the one to E through the probability-weighted sum.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# Rows per chunk keep the fp32 [rows, V] probabilities within 128 MiB (128 rows at 262k):
# enough rows for the two matmuls to run near full speed, far below [n, V].
_CHUNK_VALUES = 2**25


def _probabilities(hidden: Tensor, head_weight: Tensor, softcap: float | None) -> Tensor:
    """fp32 softmax of the capped head logits [rows, V], computed as the model does (the
    head matmul in the hidden states' dtype, or autocast's, then fp32), in place in one
    [rows, V] buffer."""
    probs = (hidden @ head_weight.to(hidden.dtype).T).float()
    if softcap is not None:
        probs.div_(softcap).tanh_().mul_(softcap)
    probs.sub_(probs.amax(dim=-1, keepdim=True)).exp_()
    return probs.div_(probs.sum(dim=-1, keepdim=True))


def _chunk_rows(vocab: int, chunk_rows: int | None) -> int:
    return max(1, chunk_rows if chunk_rows else _CHUNK_VALUES // max(vocab, 1))


def _soft_embeddings(hidden, head_weight, embed_weight, scale, softcap, rows) -> Tensor:
    out = []
    for start in range(0, hidden.shape[0], rows):
        probs = _probabilities(hidden[start : start + rows], head_weight, softcap)
        out.append(probs.to(embed_weight.dtype) @ embed_weight)
    return torch.cat(out) * scale


class _SoftEmbeddings(torch.autograd.Function):
    """Forward in chunks; backward recomputes each chunk's probabilities for dE."""

    @staticmethod
    def forward(ctx, hidden, head_weight, embed_weight, scale, softcap, rows):
        ctx.save_for_backward(hidden, head_weight)
        ctx.meta = (scale, softcap, rows, embed_weight.dtype)
        with torch.no_grad():
            return _soft_embeddings(hidden, head_weight, embed_weight, scale, softcap, rows)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        hidden, head_weight = ctx.saved_tensors
        scale, softcap, rows, dtype = ctx.meta
        grad_e = torch.zeros(head_weight.shape, dtype=torch.float32, device=grad_out.device)
        scaled = grad_out.float() * float(scale)
        for start in range(0, hidden.shape[0], rows):
            probs = _probabilities(hidden[start : start + rows], head_weight, softcap)
            if dtype != torch.float32:  # the forward multiplied probabilities cast to dtype
                probs = probs.to(dtype).float()
            grad_e.addmm_(probs.T, scaled[start : start + rows])
        return None, None, grad_e.to(dtype), None, None, None


def soft_embeddings(
    hidden: Tensor,
    head_weight: Tensor,
    embed_weight: Tensor,
    scale: float | Tensor,
    softcap: float | None,
    chunk_rows: int | None = None,
) -> Tensor:
    """softmax(cap * tanh(hidden @ head_weight.T / cap)) @ embed_weight * scale, [n, d].

    `hidden` [n, d] are pass-1 decoder states (no gradient flows into them, nor into the
    head weight through the logits); the result carries a gradient to `embed_weight`
    when it requires one. Probabilities are cast to the embedding's dtype before the
    matmul, as the model does; `scale` is the embedding's scale (a 0-dim tensor in the
    embedding's dtype, as the model multiplies by it).
    """
    if hidden.dim() != 2 or hidden.shape[1] != embed_weight.shape[1]:
        raise ValueError(f"need hidden [n, {embed_weight.shape[1]}], got {tuple(hidden.shape)}")
    rows = _chunk_rows(head_weight.shape[0], chunk_rows)
    hidden = hidden.detach()
    if torch.is_grad_enabled() and embed_weight.requires_grad:
        return _SoftEmbeddings.apply(
            hidden, head_weight.detach(), embed_weight, scale, softcap, rows
        )
    with torch.no_grad():
        return _soft_embeddings(hidden, head_weight, embed_weight, scale, softcap, rows)
