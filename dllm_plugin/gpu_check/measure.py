"""Measuring a training step: peak memory per step, the matmul peak, and step FLOPs.

Peak memory is what the caching allocator had handed out (tensors, not the allocator's
reserve nor the CUDA context), counted from just before the model is loaded:
- CUDA: `torch.cuda.max_memory_allocated`, reset at the start of every step.
- CPU: torch has no allocator statistics there, so the profiler records every CPU
  allocation and free (`profile_memory`); the running sum over a step, on top of the
  model's tensors when recording began, gives the same number. The profiler slows the
  steps, so CPU step times are only indicative (CPU runs exist to test the code path).

FLOPs are counted analytically (the usual model-FLOPs convention, so MFU does not
reward recomputation): per token, 2 per weight for the forward and 2 for the gradient
of its input, 2 more per trainable weight for its own gradient; the head only on the
rows it actually scores; attention scores 4 * layers * hidden * length forward, three
times that with backward.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "CpuMemoryMeter",
    "CudaMemoryMeter",
    "body_params",
    "head_shape",
    "make_meter",
    "matmul_peak",
    "step_flops",
    "tensor_bytes",
]

STEP_BEGIN = "gpu_check:step_begin"
STEP_END = "gpu_check:step_end"


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage counted once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        seen[(t.device.type, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


class CudaMemoryMeter:
    """Per-step peaks from the CUDA caching allocator, above the run's baseline."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0
        self.peaks: list[int] = []

    def run_begin(self) -> None:
        """Before the model is loaded: free what earlier runs left, note what remains."""
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize(self.device)
        self.baseline = torch.cuda.memory_allocated(self.device)
        self.peaks = []

    @contextlib.contextmanager
    def recording(self, model: nn.Module) -> Iterator[None]:
        yield

    def step_begin(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def step_end(self) -> None:
        torch.cuda.synchronize(self.device)
        self.peaks.append(torch.cuda.max_memory_allocated(self.device) - self.baseline)

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)


class CpuMemoryMeter:
    """Per-step peaks of CPU tensor memory, from the profiler's allocation records."""

    def __init__(self) -> None:
        self.peaks: list[int] = []
        self._start = 0

    def run_begin(self) -> None:
        gc.collect()
        self.peaks = []

    @contextlib.contextmanager
    def recording(self, model: nn.Module) -> Iterator[None]:
        from torch.profiler import ProfilerActivity, profile

        self._start = tensor_bytes(model)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield
        self.peaks = step_peaks(prof.profiler.kineto_results.events(), self._start)

    def step_begin(self) -> None:
        _mark(STEP_BEGIN)

    def step_end(self) -> None:
        _mark(STEP_END)

    def sync(self) -> None:
        pass


def _mark(name: str) -> None:
    from torch.profiler import record_function

    with record_function(name):
        pass


def step_peaks(events: Any, start_bytes: int) -> list[int]:
    """The highest live byte count inside each marked step, from allocation events."""
    live, peak, inside, peaks = start_bytes, start_bytes, False, []
    for event in sorted(events, key=lambda e: e.start_ns()):
        name = event.name()
        if name == "[memory]":
            live += event.nbytes()
            peak = max(peak, live)
        elif name == STEP_BEGIN:
            inside, peak = True, live
        elif name == STEP_END and inside:
            peaks.append(peak)
            inside = False
    return peaks


def make_meter(device: torch.device) -> CudaMemoryMeter | CpuMemoryMeter:
    return CudaMemoryMeter(device) if device.type == "cuda" else CpuMemoryMeter()


# ---- the matmul peak --------------------------------------------------------------------
def matmul_peak(
    device: torch.device, dtype: torch.dtype, size: int = 8192, reps: int = 20
) -> dict[str, Any]:
    """Best FLOP/s of repeated size x size GEMMs: the ceiling MFU is measured against.

    Measured rather than read from a datasheet: clocks, power limits and the exact part
    (H100 PCIe vs SXM, H200, ...) differ, and a machine should be judged by what it does.
    """
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 2):  # the first ones warm up (kernel choice, clocks)
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return {"flops_per_s": 2 * size**3 / best, "dtype": str(dtype), "size": size}


# ---- FLOPs --------------------------------------------------------------------------------
def head_shape(model: nn.Module) -> tuple[int, int]:
    """(hidden, vocabulary) of the vocabulary head."""
    weight = model.get_output_embeddings().weight
    return int(weight.shape[1]), int(weight.shape[0])


def body_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters outside every embedding table and the vocabulary head.

    4-bit weights are counted by their logical size (bitsandbytes stores two per byte).
    """
    head = model.get_output_embeddings()
    skip = {id(head.weight)} | ({id(head.bias)} if head.bias is not None else set())
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            skip.add(id(module.weight))
    total = 0
    for p in model.parameters():
        if id(p) in skip or (trainable_only and not p.requires_grad):
            continue
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += int(torch.Size(shape).numel()) if shape is not None else p.numel()
    return total


def step_flops(
    model: nn.Module, tokens: int, length: int, scored_rows: float, layers: int
) -> float:
    """Model FLOPs of one optimizer step (see the module docstring)."""
    hidden, vocab = head_shape(model)
    body = body_params(model)
    body_trainable = body_params(model, trainable_only=True)
    head_trainable = model.get_output_embeddings().weight.requires_grad
    attention = 12 * layers * hidden * length * tokens
    body_flops = (4 * body + 2 * body_trainable) * tokens
    head_flops = (4 + (2 if head_trainable else 0)) * hidden * vocab * scored_rows
    return float(body_flops + head_flops + attention)
