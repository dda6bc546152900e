"""Masked-diffusion SFT loss pieces: noising, loss weights, normalisation, chunked CE.

Everything here is pure tensor math (no model, no Trainer) so it can be tested exactly
against dense references: the MDLM / LLaDA recipe and Dream's CART weighting.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .schedules import NoiseSchedule

__all__ = [
    "IGNORE_INDEX",
    "cart_weights",
    "chunked_linear_cross_entropy",
    "full_logits_cross_entropy",
    "loss_weights",
    "normalise_loss",
    "parse_loss_weight_type",
    "sample_masks",
    "sample_timesteps",
]

IGNORE_INDEX = -100
"""Label value that is never masked and never scored (prompt tokens)."""

LOSS_WEIGHT_FORMS = ("scheduler", "uniform", "cart[geo_p:P] with 0 < P < 1")
NORM_TYPES = ("token", "sequence", "batch")

# Chunk length of the dense per-chunk decay matrix in the CART scan: the work per
# position is _SCAN_CHUNK multiply-adds, the matrix is _SCAN_CHUNK**2 values.
_SCAN_CHUNK = 64


# --------------------------------------------------------------------------- noising


def _draw_uniform(shape: tuple[int, ...], device, generator: torch.Generator | None) -> Tensor:
    """U[0, 1) on `device`; drawn on the generator's own device so a CPU generator works
    for CUDA batches (torch refuses a generator on another device)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if generator is None or generator.device == device:
        return torch.rand(shape, generator=generator, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def sample_timesteps(
    batch_size: int, eps: float, device, generator: torch.Generator | None = None
) -> Tensor:
    """One diffusion time per sequence, t ~ U[eps, 1).

    eps > 0 keeps t away from 0, where the ELBO weight 1/t (linear) blows up.
    """
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"time epsilon must be in [0, 1), got {eps}")
    return eps + (1.0 - eps) * _draw_uniform((batch_size,), device, generator)


def sample_masks(
    maskable: Tensor, mask_prob: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Mask each maskable position independently with its row's probability.

    The uniform draw always covers the full [b, l] shape so the random stream consumed
    does not depend on which positions are maskable (reproducible across label choices).
    """
    if maskable.dim() != 2:
        raise ValueError(f"maskable must be [batch, length], got shape {tuple(maskable.shape)}")
    if mask_prob.shape != maskable.shape[:1]:
        raise ValueError(
            f"mask_prob must be [batch] = [{maskable.shape[0]}], got {tuple(mask_prob.shape)}"
        )
    u = _draw_uniform(tuple(maskable.shape), maskable.device, generator)
    return (u < mask_prob.to(u.dtype)[:, None]) & maskable.bool()


# ------------------------------------------------------------------------ weight types


_CART_RE = re.compile(r"cart\[geo_p:([^\]]*)\]")


def parse_loss_weight_type(value: str) -> tuple[str, float | None]:
    """Parse the `loss_weight_type` option into (kind, geo_p).

    Strict on purpose: a typo such as "cart[geo:0.3]" must fail loudly instead of
    silently training with another weighting.
    """
    forms = ", ".join(repr(f) for f in LOSS_WEIGHT_FORMS)
    if not isinstance(value, str):
        raise ValueError(f"loss_weight_type must be one of {forms}; got {value!r}")
    text = value.strip()
    if text in ("scheduler", "uniform"):
        return text, None
    match = _CART_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"loss_weight_type must be one of {forms}; got {value!r}")
    try:
        geo_p = float(match.group(1))
    except ValueError:
        raise ValueError(
            f"loss_weight_type {value!r}: geo_p must be a number in (0, 1); accepted: {forms}"
        ) from None
    if not 0.0 < geo_p < 1.0 or not math.isfinite(geo_p):
        raise ValueError(
            f"loss_weight_type {value!r}: geo_p must be in (0, 1), got {geo_p}; accepted: {forms}"
        )
    return "cart", geo_p


# ------------------------------------------------------------------------------- CART


def _scan_dtype(device: torch.device) -> torch.dtype:
    """float64 for the scan: immune to TF32 matmuls (HF `tf32=True`) and to the long
    sums at 32k positions. MPS has no float64, so it falls back to float32 there."""
    return torch.float32 if device.type == "mps" else torch.float64


def _decay_matrix(size: int, q: float, like: Tensor) -> Tensor:
    """Lower-triangular T[a, c] = q**(a - c) for a >= c: one dense chunk of the scan.

    Only non-negative powers of q appear, so nothing overflows; tiny values underflow
    to 0, which is their correct limit.
    """
    idx = torch.arange(size, device=like.device, dtype=like.dtype)
    diff = idx[:, None] - idx[None, :]
    return torch.where(diff >= 0, torch.pow(q, diff.clamp_min(0)), torch.zeros_like(diff))


def _geometric_scan(x: Tensor, q: float, chunk: int = _SCAN_CHUNK) -> Tensor:
    """Inclusive linear recurrence h[i] = q * h[i-1] + x[i] along the last dim of [b, l].

    Linear in l: each chunk of `chunk` positions is solved with one small dense matrix,
    then the chunk-end states (a recurrence with decay q**chunk over l / chunk values)
    are solved by the same routine recursively and folded back in.
    """
    b, length = x.shape
    if length <= chunk:
        return x @ _decay_matrix(length, q, x).T
    n_chunks = -(-length // chunk)
    padded = F.pad(x, (0, n_chunks * chunk - length)).view(b, n_chunks, chunk)
    local = padded @ _decay_matrix(chunk, q, x).T  # [b, n_chunks, chunk]
    ends = _geometric_scan(local[:, :, -1].contiguous(), q**chunk, chunk)  # [b, n_chunks]
    carry_in = F.pad(ends[:, :-1], (1, 0))  # state just before each chunk
    powers = torch.pow(q, torch.arange(1, chunk + 1, device=x.device, dtype=x.dtype))
    out = local + carry_in[:, :, None] * powers
    return out.view(b, n_chunks * chunk)[:, :length]


def _check_geo_p(geo_p: float | None) -> float:
    if geo_p is None or not 0.0 < float(geo_p) < 1.0:
        raise ValueError(f"CART geo_p must be in (0, 1), got {geo_p!r}")
    return float(geo_p)


def cart_weights(masked_mask: Tensor, geo_p: float) -> Tensor:
    """Dream's CART weights, linear in the sequence length.

    For a masked position i: w_i = sum over unmasked j != i of 0.5 p (1-p)**(|i-j| - 1),
    i.e. how much clean context sits near i (Dream 7B, sec. 4.2); unmasked positions get
    0. The sum splits into a left and a right geometric scan over the clean indicator,
    so no l x l matrix is built (the dense form needs 4 GB at l = 32k).
    """
    p = _check_geo_p(geo_p)
    if masked_mask.dim() != 2:
        raise ValueError(f"masked_mask must be [batch, length], got {tuple(masked_mask.shape)}")
    masked = masked_mask.bool()
    b, length = masked.shape
    if b == 0 or length == 0:
        return torch.zeros(b, length, dtype=torch.float32, device=masked.device)
    clean = (~masked).to(_scan_dtype(masked.device))
    q = 1.0 - p
    # One batched scan for both directions: rows [:b] run left to right and give
    # sum_{j <= i} clean_j q**(i - j); rows [b:] run on the flipped rows (j >= i).
    both = _geometric_scan(torch.cat([clean, clean.flip(-1)]), q)
    from_left, from_right = both[:b], both[b:].flip(-1)
    near = torch.zeros_like(clean)
    near[:, 1:] += from_left[:, :-1]  # j < i: exponent i - j - 1
    near[:, :-1] += from_right[:, 1:]  # j > i: exponent j - i - 1
    return (0.5 * p * near * masked).to(torch.float32)


def loss_weights(
    kind: str,
    t: Tensor,
    masked: Tensor,
    schedule: NoiseSchedule,
    geo_p: float | None = None,
) -> Tensor:
    """Per-position fp32 loss weights [b, l]; zero wherever the position is not masked."""
    masked = masked.bool()
    if kind == "scheduler":
        per_row = schedule.weight(t.to(torch.float32))
        return per_row[:, None] * masked
    if kind == "uniform":
        return masked.to(torch.float32)
    if kind == "cart":
        return cart_weights(masked, _check_geo_p(geo_p))
    raise ValueError(f"unknown loss weight kind {kind!r}; accepted: 'scheduler', 'uniform', 'cart'")


# ----------------------------------------------------------------------- normalisation


def normalise_loss(
    weighted: Tensor,
    maskable: Tensor,
    norm_type: str,
    num_items: int | Tensor | None = None,
) -> Tensor:
    """Reduce weighted per-position losses [b, l] to the scalar training loss.

    token: sum / maskable tokens. `num_items` (only for "token") replaces the local count
    by the global one over gradient-accumulation micro-batches and processes, so the
    loss scale does not depend on GA steps or world size.
    sequence: mean over rows of (row sum / row maskable count); empty rows add 0.
    batch: sum / b.
    """
    if norm_type == "token":
        denom = maskable.sum() if num_items is None else torch.as_tensor(num_items)
        denom = denom.to(device=weighted.device, dtype=weighted.dtype).clamp_min(1)
        return weighted.sum() / denom
    if norm_type == "sequence":
        counts = maskable.sum(dim=1).to(weighted.dtype)
        per_row = weighted.sum(dim=1) / counts.clamp_min(1)
        per_row = torch.where(counts > 0, per_row, torch.zeros_like(per_row))
        return per_row.sum() / max(weighted.shape[0], 1)
    if norm_type == "batch":
        return weighted.sum() / max(weighted.shape[0], 1)
    accepted = ", ".join(repr(n) for n in NORM_TYPES)
    raise ValueError(f"unknown loss normalisation {norm_type!r}; accepted: {accepted}")


# ------------------------------------------------------------------ cross-entropy head


def full_logits_cross_entropy(
    logits: Tensor, targets: Tensor, token_weights: Tensor
) -> tuple[Tensor, Tensor]:
    """Reference: (sum_i w_i CE_i, detached fp32 CE [n]) from materialised logits."""
    ce = F.cross_entropy(logits.float(), targets, reduction="none", ignore_index=IGNORE_INDEX)
    return (token_weights.float() * ce).sum(), ce.detach()


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


def _chunked_ce(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    token_weights: Tensor,
    chunk_size: int,
    mm_dtype: torch.dtype,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Loop over row chunks: loss, per-token CE and (when needed) all gradients at once.

    One fp32 [V, chunk] buffer (transposed logits) is reused by every chunk and updated
    in place: logits -> exp(logits - max) -> minus sum * one-hot. The per-row factor
    w / sum goes onto the small [chunk, d] operands of the two gradient matmuls rather
    than onto the big block. Weight and bias gradients accumulate in fp32.
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
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h = hidden[start:end].to(mm_dtype)
        block = buffer[: vocab * (end - start)].view(vocab, end - start)
        _logits_columns(h, w_mm, b_mm, block)
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
    def forward(ctx, hidden, weight, bias, targets, token_weights, chunk_size, mm_dtype, needs):
        with _autocast_off(hidden.device.type):
            total, ce, grad_h, grad_w, grad_b = _chunked_ce(
                hidden, weight, bias, targets, token_weights, chunk_size, mm_dtype, needs
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
        return (*scaled, None, None, None, None, None)


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
) -> tuple[Tensor, Tensor]:
    """Weighted CE of the LM head on selected positions without [n, V] logits.

    Returns (sum_i token_weights[i] * CE_i as a 0-dim fp32 tensor carrying gradients to
    hidden / weight / bias, detached fp32 per-token CE [n] for metrics). Targets equal
    to -100 score 0. Under autocast the matmuls run in the autocast dtype and softmax in
    fp32; returned gradients have each input's dtype. Gradient work is skipped for
    inputs that do not require grad (a frozen LoRA head) and entirely under no_grad.
    """
    _check_ce_shapes(hidden, weight, bias, targets, token_weights, chunk_size)
    mm_dtype = _matmul_dtype(hidden, weight)
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    if not any(needs):
        with _autocast_off(hidden.device.type):
            total, ce, *_ = _chunked_ce(
                hidden, weight, bias, targets, token_weights, int(chunk_size), mm_dtype, needs
            )
        return total, ce
    return _ChunkedLinearCE.apply(
        hidden, weight, bias, targets, token_weights, int(chunk_size), mm_dtype, needs
    )
