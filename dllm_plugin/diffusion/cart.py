"""Dream's CART loss weights in linear time.

For each masked position i, w_i = sum over unmasked positions j != i of
0.5 * p * (1 - p) ** (|i - j| - 1); unmasked positions get 0. The reference builds a
dense l x l matrix; the same weights follow from two geometric scans (from the left and
from the right), computed here in chunks of a small dense decay matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Chunk length of the dense per-chunk decay matrix in the CART scan: the work per
# position is _SCAN_CHUNK multiply-adds, the matrix is _SCAN_CHUNK**2 values.
_SCAN_CHUNK = 64


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


def block_cart_weights(masked_mask: Tensor, geo_p: float, block_size: int) -> Tensor:
    """CART for block diffusion: only the context a noised block sees counts.

    A masked token of block b sees the unmasked tokens of its own block and every token
    of blocks < b (the clean prefix); later blocks are invisible. The prefix term is a
    geometric series in closed form: for offset o inside block b,
    sum_{j < bB} 0.5 p (1-p)**(i - j - 1) = 0.5 (1-p)**o (1 - (1-p)**(bB)).
    """
    p = _check_geo_p(geo_p)
    masked = masked_mask.bool()
    b, length = masked.shape
    if length % block_size:
        raise ValueError(f"length {length} is not a multiple of the block size {block_size}")
    within = cart_weights(masked.reshape(-1, block_size), p).reshape(b, length)
    q = 1.0 - p
    index = torch.arange(length, device=masked.device, dtype=_scan_dtype(masked.device))
    offset = index % block_size
    prefix = 0.5 * torch.pow(q, offset) * (1.0 - torch.pow(q, index - offset))
    return within + (prefix.to(torch.float32) * masked)
