"""The vocabulary head and cross-entropy on selected rows, chunk by chunk.

Full-vocabulary logits are b*l*V values (V = 126k LLaDA, 152k Dream, 262k
DiffusionGemma); only the scored positions are scored, so the head runs on those rows
only and in chunks, and the gradients are computed during the forward chunk by chunk:
neither [b*l, V] nor [n, V] logits ever exist. Models that soft-cap their logits
(cap * tanh(z / cap), Gemma) get the cap applied inside the chunk, its derivative
included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .loss import IGNORE_INDEX


def _matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype autocast would run the head matmul in, else the inputs' common dtype."""
    device_type = hidden.device.type
    with contextlib.suppress(RuntimeError, TypeError, AttributeError):
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


@contextlib.contextmanager
def _autocast_off(device_type: str) -> Iterator[None]:
    """Disable autocast so our explicit dtypes (matmul dtype, fp32 softmax) hold."""
    enabled = False
    with contextlib.suppress(RuntimeError, TypeError, AttributeError):
        enabled = torch.is_autocast_enabled(device_type)
    if not enabled:
        yield
        return
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def _softmax_columns(block: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """In place: fp32 logits [V, rows] -> exp(logits - column max). Returns (CE, column sums).

    One pass each for max, subtract, exp and sum and no temporary [V, rows] tensor
    (torch.logsumexp allocates one, and the softmax gradient would exponentiate again).
    """
    picked = block.gather(0, targets[None, :]).squeeze(0)
    col_max = block.amax(dim=0)
    block.sub_(col_max).exp_()
    col_sum = block.sum(dim=0)
    return col_max + col_sum.log() - picked, col_sum


def _logits_columns(h: Tensor, w_mm: Tensor, b_mm: Tensor | None, out: Tensor) -> None:
    """out[V, rows] = W h^T (+ b) in fp32; W @ h^T is the fast GEMM layout for few rows."""
    if out.dtype != w_mm.dtype:
        out.copy_(w_mm @ h.T if b_mm is None else torch.addmm(b_mm[:, None], w_mm, h.T))
    elif b_mm is None:
        torch.mm(w_mm, h.T, out=out)
    else:
        torch.addmm(b_mm[:, None], w_mm, h.T, out=out)


def _softcap_columns(block: Tensor, cap: float, slope: Tensor | None) -> None:
    """In place: z -> cap * tanh(z / cap); `slope` (when given) receives d(capped)/dz =
    1 - tanh(z / cap)^2, which the gradient needs after `block` has been exponentiated."""
    block.div_(cap).tanh_()
    if slope is not None:
        torch.mul(block, block, out=slope)
        slope.neg_().add_(1.0)
    block.mul_(cap)


def _chunked_ce(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    token_weights: Tensor,
    chunk_size: int,
    mm_dtype: torch.dtype,
    needs: tuple[bool, bool, bool],
    softcap: float | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Loop over row chunks: loss, per-token CE and (when needed) all gradients at once.

    One fp32 [V, chunk] buffer (transposed logits) is reused by every chunk and updated
    in place: logits -> exp(logits - max) -> minus sum * one-hot. The per-row factor
    w / sum goes onto the small [chunk, d] operands of the two gradient matmuls rather
    than onto the big block. Weight and bias gradients accumulate in fp32. With
    `softcap`, a second buffer of the same size holds the cap's slope for the gradient.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    w_mm = weight.to(mm_dtype)
    b_mm = bias.to(mm_dtype) if bias is not None else None
    tw = token_weights.to(device=device, dtype=torch.float32)
    ce = torch.zeros(n, dtype=torch.float32, device=device)
    grad_h = torch.empty_like(hidden) if needs[0] else None
    # Empty when the first chunk will overwrite it: no zero-fill pass over [V, d].
    new_grad_w = torch.empty if n > 0 else torch.zeros
    grad_w = new_grad_w(weight.shape, dtype=torch.float32, device=device) if needs[1] else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=device) if needs[2] else None
    buffer = torch.empty(vocab * min(chunk_size, n), dtype=torch.float32, device=device)
    slopes = torch.empty_like(buffer) if softcap is not None and any(needs) else None
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h = hidden[start:end].to(mm_dtype)
        block = buffer[: vocab * (end - start)].view(vocab, end - start)
        _logits_columns(h, w_mm, b_mm, block)
        slope = slopes[: block.numel()].view_as(block) if slopes is not None else None
        if softcap is not None:
            _softcap_columns(block, softcap, slope)
        tgt = targets[start:end]
        valid = tgt != IGNORE_INDEX
        safe_tgt = torch.where(valid, tgt, torch.zeros_like(tgt))
        ce_rows, col_sum = _softmax_columns(block, safe_tgt)
        ce[start:end] = ce_rows * valid
        if not any(needs):
            continue
        # w * dCE/dlogits = (w / sum) * (E - sum * onehot), with E = exp(logits - max).
        coef = tw[start:end] * valid / col_sum
        block.scatter_add_(0, safe_tgt[None, :], -col_sum[None, :])
        if slope is not None:
            block.mul_(slope)
        if grad_b is not None:
            grad_b.addmv_(block, coef)
        g = block.to(mm_dtype)
        if grad_h is not None:
            grad_h[start:end] = (g.T @ w_mm) * coef[:, None]
        if grad_w is not None:
            scaled_h = (h.float() * coef[:, None]).to(mm_dtype)
            if mm_dtype == torch.float32 and start == 0:
                torch.mm(g, scaled_h, out=grad_w)
            elif mm_dtype == torch.float32:
                grad_w.addmm_(g, scaled_h)
            elif start == 0:
                grad_w.copy_(g @ scaled_h)
            else:
                grad_w += (g @ scaled_h).float()
        del g
    total = (tw * ce).sum()
    return total, ce, grad_h, grad_w, grad_b


class _ChunkedLinearCE(torch.autograd.Function):
    """Head + CE whose gradients are computed during forward, chunk by chunk.

    Backward only rescales the stored gradients by grad_output, so the [n, V] logits
    are never kept for backward (nor rebuilt). Not twice differentiable.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, token_weights, chunk_size, mm_dtype, needs, softcap
    ):
        with _autocast_off(hidden.device.type):
            total, ce, grad_h, grad_w, grad_b = _chunked_ce(
                hidden, weight, bias, targets, token_weights, chunk_size, mm_dtype, needs, softcap
            )
        ctx.mark_non_differentiable(ce)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_ce):
        grads, ctx.grads = ctx.grads, None
        scaled = []
        for grad, dtype in zip(grads, ctx.dtypes, strict=True):
            if grad is None:
                scaled.append(None)
            elif grad.dtype == torch.float32:  # ours alone: scale in place, no [V, d] copy
                scaled.append(grad.mul_(grad_total.float()).to(dtype))
            else:
                scaled.append((grad.to(torch.float32) * grad_total.float()).to(dtype))
        return (*scaled, None, None, None, None, None, None)


def _check_ce_shapes(hidden, weight, bias, targets, token_weights, chunk_size) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"need hidden [n, d] and weight [V, d], got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    n = hidden.shape[0]
    if targets.shape != (n,) or token_weights.shape != (n,):
        raise ValueError(
            f"targets and token_weights must be [{n}], got {tuple(targets.shape)} and "
            f"{tuple(token_weights.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def chunked_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    token_weights: Tensor,
    chunk_size: int = 2048,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Weighted CE of the LM head on selected positions without [n, V] logits.

    Returns (sum_i token_weights[i] * CE_i as a 0-dim fp32 tensor carrying gradients to
    hidden / weight / bias, detached fp32 per-token CE [n] for metrics). Targets equal
    to -100 score 0. `softcap`: the logits are cap * tanh((W h + b) / cap), in fp32, as
    Gemma's head computes them. Under autocast the matmuls run in the autocast dtype and
    softmax in fp32; returned gradients have each input's dtype. Gradient work is skipped
    for inputs that do not require grad (a frozen LoRA head) and entirely under no_grad.
    """
    _check_ce_shapes(hidden, weight, bias, targets, token_weights, chunk_size)
    mm_dtype = _matmul_dtype(hidden, weight)
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 (or None), got {softcap}")
    cap = float(softcap) if softcap is not None else None
    if not any(needs):
        with _autocast_off(hidden.device.type):
            total, ce, *_ = _chunked_ce(
                hidden, weight, bias, targets, token_weights, int(chunk_size), mm_dtype, needs, cap
            )
        return total, ce
    return _ChunkedLinearCE.apply(
        hidden, weight, bias, targets, token_weights, int(chunk_size), mm_dtype, needs, cap
    )
