"""The memory model: peak training memory of a model shape in a mode, and what fits.

    peak = weights + 2 x trainable + autocast copies          (computed from the shape)
         + g x gradients + tokens x (a x layers x hidden + c) + e     (g, a, c, e fitted)

- weights: the bytes of every parameter and buffer as the mode stores them, counted on a
  meta-device copy of the model built from its config (no memory used), with LoRA
  applied by the loader's own `wrap_lora`: fp32 for full fine-tuning (fp32 master
  weights), the run dtype for a LoRA base, fp32 LoRA weights; with 4-bit, every Linear
  outside the family's head is NF4 with double quantisation (0.5 + 1/64 + 1/4096 bytes
  per weight) and every other weight fp32 (peft's `prepare_model_for_kbit_training`
  upcasts them).
- 2 x trainable: AdamW's two moments, in the trainable weights' dtype (from step 2 on
  they exist for the whole step).
- autocast copies: under bf16/fp16 autocast every fp32 Linear weight is cast once per
  forward and the copy is kept for the backward (2 bytes per weight).
- g x gradients: how much of the gradients (trainable bytes) coexists with the
  activations at the peak: about 1 when the peak is late in the backward, 0 when it is
  at the full-vocabulary logits before any gradient exists. Fitted within [0, 1].
- activations per token a x layers x hidden + c (a, c >= 0) and a constant e
  (workspaces, the chunked head's block), fitted per (family, mode).

The fit is least squares on the measured peaks of runs at two sizes and several token
counts (the bounds solved exactly by trying every set of active bounds). It must then
reproduce every measured peak within `MAX_ERROR`; it predicts, for a released shape
(LLaDA-8B, Dream-7B), the largest batch per max_length that fits a memory budget. The
activations are extrapolated from models of about 1B parameters: a plan, not a promise.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .workloads import Mode, Shape, Workload

__all__ = [
    "MAX_ERROR",
    "Fit",
    "Point",
    "StaticMemory",
    "fit_points",
    "largest_batch",
    "plan_lengths",
    "static_memory",
]

MAX_ERROR = 0.15  # the largest relative error allowed on a measured peak
# NF4 with double quantisation: 4 bits, a uint8 absmax per 64 weights, an fp32 per 256 of those.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
ADAMW_STATES = 2  # per trainable weight: AdamW's exp_avg and exp_avg_sq
MAX_BATCH = 1024  # the search stops here
LENGTHS = (256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class StaticMemory:
    """The memory that does not grow with tokens: weights, gradients, optimizer states,
    and autocast's low-precision copies of fp32 Linear weights (kept for the backward)."""

    weight_bytes: float
    trainable_bytes: float
    autocast_copy_bytes: float
    trainable_params: int
    total_params: int
    quantized_params: int = 0  # weights stored in 4 bits

    @property
    def fixed(self) -> float:
        """Weights, AdamW states and autocast copies: present throughout a step."""
        return self.weight_bytes + ADAMW_STATES * self.trainable_bytes + self.autocast_copy_bytes

    @property
    def gradient_bytes(self) -> float:
        return self.trainable_bytes


def static_memory(workload: Workload, config: Any, mode: Mode) -> StaticMemory:
    """Weights, gradients and AdamW states of this model in this mode (see module doc)."""
    from transformers import AutoModelForMaskedLM

    from .. import models  # noqa: F401  (registers LLaDA and Dream)
    from ..models.families import FAMILIES
    from ..models.loading import wrap_lora
    from .runner import load_options

    base_dtype = getattr(torch, mode.dtype) if (mode.lora or mode.load_in_4bit) else torch.float32
    with torch.device("meta"):
        model = AutoModelForMaskedLM.from_config(config, dtype=base_dtype)
    quantized: set[int] = set()
    if mode.load_in_4bit:
        skip = FAMILIES[workload.family].head_prefixes
        quantized = {
            id(module.weight)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not any(s in name for s in skip)
        }
    if mode.lora:
        model, _ = wrap_lora(model, workload.family, load_options(mode), [])
    copy_size = 0 if mode.dtype == "float32" else getattr(torch, mode.dtype).itemsize
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    weights = trainable = copies = 0.0
    trainable_params = total_params = quantized_params = 0
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        n = tensor.numel()
        if id(tensor) in quantized:
            size = n * NF4_BYTES
            quantized_params += n
        elif mode.load_in_4bit and tensor.is_floating_point() and tensor.element_size() < 4:
            size = n * 4.0
        else:
            size = n * tensor.element_size()
        weights += size
        if id(tensor) in linear_weights and id(tensor) not in quantized and size == n * 4.0:
            copies += n * copy_size
        if isinstance(tensor, nn.Parameter):
            total_params += n
            if tensor.requires_grad:
                trainable += size
                trainable_params += n
    return StaticMemory(
        weights, trainable, copies, trainable_params, total_params, quantized_params
    )


@dataclass(frozen=True)
class Point:
    """One measured peak: a run's phase."""

    run: str  # the run's key
    layers: int
    hidden: int
    tokens: int
    fixed_bytes: float
    gradient_bytes: float
    peak_bytes: float


# The fitted coefficients and their bounds.
BOUNDS = {
    "g": (0.0, 1.0),  # share of the gradients alive at the peak
    "a": (0.0, math.inf),  # bytes per token per (layer x hidden unit)
    "c": (0.0, math.inf),  # bytes per token besides
    "e": (-math.inf, math.inf),  # bytes
}


@dataclass
class Fit:
    """The fitted part of the memory model for one (family, mode)."""

    family: str
    mode: str
    coefs: dict[str, float]
    points: list[Point] = field(default_factory=list)

    def activation_per_token(self, shape: Shape) -> float:
        return self.coefs["a"] * shape.layers * shape.hidden + self.coefs["c"]

    def predict(
        self, fixed_bytes: float, gradient_bytes: float, layers: int, hidden: int, tokens: int
    ) -> float:
        per_token = self.coefs["a"] * layers * hidden + self.coefs["c"]
        return fixed_bytes + self.coefs["g"] * gradient_bytes + tokens * per_token + self.coefs["e"]

    def errors(self) -> list[float]:
        """Relative error of the prediction on every measured peak."""
        return [
            (
                self.predict(p.fixed_bytes, p.gradient_bytes, p.layers, p.hidden, p.tokens)
                - p.peak_bytes
            )
            / p.peak_bytes
            for p in self.points
        ]

    @property
    def max_error(self) -> float:
        return max((abs(e) for e in self.errors()), default=0.0)


def _features(points: list[Point]) -> dict[str, torch.Tensor]:
    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64)

    return {
        "g": column([p.gradient_bytes for p in points]),
        "a": column([float(p.tokens * p.layers * p.hidden) for p in points]),
        "c": column([float(p.tokens) for p in points]),
        "e": column([1.0] * len(points)),
    }


def fit_points(family: str, mode: str, points: list[Point]) -> Fit | str:
    """Bounded least squares (see the module doc); a reason string if it cannot be fitted.

    Every coefficient is either inside its bounds or at one of them at the optimum, so
    trying each choice (free, or fixed at a finite bound) and keeping the best feasible
    least-squares solution is exact.
    """
    if len({p.layers * p.hidden for p in points}) < 2 or len(points) < 4:
        return "needs measured peaks at two model sizes (four or more in all)"
    target = torch.tensor([p.peak_bytes - p.fixed_bytes for p in points], dtype=torch.float64)
    features = _features(points)
    choices = [
        [None] + [b for b in BOUNDS[name] if math.isfinite(b)] for name in BOUNDS
    ]  # None: free
    best: tuple[float, dict[str, float]] | None = None
    for states in itertools.product(*choices):
        fixed = {n: v for n, v in zip(BOUNDS, states, strict=True) if v is not None}
        free = [n for n in BOUNDS if n not in fixed]
        rest = target - sum((features[n] * v for n, v in fixed.items()), torch.zeros_like(target))
        coefs = dict(fixed)
        if free:
            scale = {n: float(features[n].abs().max()) or 1.0 for n in free}
            design = torch.stack([features[n] / scale[n] for n in free], dim=1)
            solution = torch.linalg.lstsq(design, rest[:, None], driver="gelsd").solution[:, 0]
            coefs.update({n: float(solution[i]) / scale[n] for i, n in enumerate(free)})
        if any(not (BOUNDS[n][0] <= coefs[n] <= BOUNDS[n][1]) for n in free):
            continue
        fitted = sum((features[n] * coefs[n] for n in BOUNDS), torch.zeros_like(target))
        sse = float(((fitted - target) ** 2).sum())
        if best is None or sse < best[0] * (1 - 1e-9):
            best = (sse, coefs)
    assert best is not None  # all coefficients at a bound but e free is always feasible
    return Fit(family, mode, best[1], list(points))


def largest_batch(fit: Fit, static: StaticMemory, shape: Shape, length: int, budget: float) -> int:
    """The largest batch of `length`-token rows whose predicted peak fits `budget` (0: none)."""
    room = budget - fit.predict(static.fixed, static.gradient_bytes, shape.layers, shape.hidden, 0)
    per_row = length * fit.activation_per_token(shape)
    if room < per_row:
        return 0
    if per_row <= 0:
        return MAX_BATCH
    return min(int(room // per_row), MAX_BATCH)


def plan_lengths(max_length: int) -> list[int]:
    return [n for n in LENGTHS if n <= max_length]
