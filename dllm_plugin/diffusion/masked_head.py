"""Score only the masked positions: the vocabulary head runs on their hidden states.

The forward runs through the (DDP/peft-wrapped) model with its output Linear swapped
for a pass-through, so `.logits` are the head's input [b, l, d]; the rows of the masked
positions (for right-shifted models: the rows one to the left) then go through the
chunked head + cross-entropy. Whether that is exact for a model is decided once per
(model, head) by `HeadVerdict`: the head must be a plain Linear held whole here, and a
one-off probe forward must show that the model's logits are head(head input). Otherwise
the full-logits path runs, with one log line.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .chunked_ce import chunked_linear_cross_entropy
from .loss import full_logits_cross_entropy

logger = logging.getLogger(__name__)

# The fp32 [V, rows] block of the chunked CE stays within max(32 MiB, an eighth of the
# head's fp32 gradient, which exists anyway): flat memory, yet enough rows for fast GEMMs.
_BLOCK_VALUES = 2**23


def parent_of(root: nn.Module, child: nn.Module) -> tuple[nn.Module, str] | None:
    """(module, attribute name) that holds `child` inside `root`, or None."""
    for module in root.modules():
        for name, sub in module.named_children():
            if sub is child:
                return module, name
    return None


class _HeadStandIn(nn.Module):
    """Takes the head's place: returns its input, or (empty_output) a [..., 0] view of it
    for models that post-process their logits (a soft-cap would distort the input)."""

    def __init__(self, empty_output: bool):
        super().__init__()
        self.empty_output = empty_output

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[..., :0] if self.empty_output else hidden


@contextlib.contextmanager
def swapped_head(
    model: nn.Module, head: nn.Module, empty_output: bool = False
) -> Iterator[list[torch.Tensor]]:
    """Run the model with its vocabulary head replaced by a pass-through.

    `.logits` are then the head's input (with `empty_output`: an empty tensor, and the
    head's input is only in the yielded list). Yields the list of the stand-in's inputs,
    so callers can check that the head ran exactly once and that its output came back
    untouched. The forward still goes through `model` (DDP/peft wrappers included), so
    gradient synchronisation hooks see it; the head is applied afterwards to masked rows.
    """
    found = parent_of(model, head)
    if found is None:
        raise RuntimeError("the output head is not a submodule of the model")
    parent, name = found
    seen: list[torch.Tensor] = []
    stand_in = _HeadStandIn(empty_output)
    stand_in.register_forward_hook(lambda _module, args, _out: seen.append(args[0]))
    setattr(parent, name, stand_in)
    try:
        yield seen
    finally:
        setattr(parent, name, head)


def is_head_input(seen: torch.Tensor, returned: torch.Tensor) -> bool:
    """True if the model returned what the stand-in head passed through, unchanged.

    DDP with find_unused_parameters returns a clone (equal, not `is`); accelerate's
    mixed-precision wrapper returns a bf16/fp16 output upcast to fp32 (exact, so equal
    after the same cast).
    """
    if seen is returned:
        return True
    if seen.shape != returned.shape:
        return False
    if seen.dtype != returned.dtype:
        if returned.dtype != torch.float32 or seen.dtype not in (torch.bfloat16, torch.float16):
            return False
        seen = seen.to(returned.dtype)
    return torch.equal(seen, returned)


def _probe(unwrapped: nn.Module, head: nn.Linear, input_ids: torch.Tensor) -> str | None:
    """None if the model's logits equal head(head input) on a tiny forward, else why not.

    Eval mode (no dropout, no checkpointing) under no_grad; train flags are restored.
    """
    ids = input_ids[:1, : min(int(input_ids.shape[1]), 8)]
    modes = [(m, m.training) for m in unwrapped.modules()]
    try:
        unwrapped.eval()
        with torch.no_grad():
            full = unwrapped(input_ids=ids).logits
            with swapped_head(unwrapped, head) as seen:
                hidden = unwrapped(input_ids=ids).logits
            if len(seen) != 1 or not is_head_input(seen[0], hidden):
                return "the model does not return its head's output unchanged"
            separate = head(hidden)
    except Exception as e:  # e.g. the forward reads the head's weight directly
        return f"the check forward failed: {type(e).__name__}: {e}"
    finally:
        for module, mode in modes:
            module.training = mode
    if separate.shape != full.shape or not torch.allclose(
        separate.float(), full.float(), rtol=1e-4, atol=1e-5
    ):
        return "head(head input) differs from the model's logits"
    return None


class HeadVerdict:
    """Whether running the vocabulary head ourselves on picked rows is exact, per model.

    Structure: get_output_embeddings() must be a plain nn.Linear submodule whose weight
    is held whole here (FSDP and ZeRO-3 keep empty local shards; a 4-bit or LoRA head is
    another type), and DDP must not look for unused parameters. Behaviour: the probe
    (the head is the model's last operation and runs once: no logit scaling or
    soft-capping, no sparse prediction). Decided once per (model, head). `probe=False`
    is for methods that know their model's head and apply its post-processing (a
    soft-cap) themselves: only the structure is checked.
    """

    def __init__(
        self,
        unwrap: Callable[[nn.Module], nn.Module],
        sharded: Callable[[], bool],
        probe: bool = True,
    ):
        self._unwrap = unwrap
        self._sharded = sharded
        self._probe = probe
        self._decided: tuple[nn.Module, nn.Module, str | None] | None = None
        self._fallback_logged = False

    @property
    def reason(self) -> str | None:
        """Why the head is not run separately (None: it is), for the last model seen."""
        if self._decided is None:
            raise RuntimeError("no batch has been scored yet")
        return self._decided[2]

    def head(self, model: nn.Module, input_ids: torch.Tensor) -> nn.Linear | None:
        """The head to run on picked rows, or None for the full-logits path."""
        unwrapped = self._unwrap(model)
        getter = getattr(unwrapped, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        if self._decided is None or self._decided[0] is not head or self._decided[1] is not model:
            self._decided = (head, model, self._why_not(model, unwrapped, head, input_ids))
        reason = self._decided[2]
        if reason is None:
            return head
        if not self._fallback_logged:
            logger.warning(
                "score_masked_only: the output head cannot be run separately (%s); "
                "scoring with full logits",
                reason,
            )
            self._fallback_logged = True
        return None

    def _why_not(
        self, model: nn.Module, unwrapped: nn.Module, head: nn.Module | None, ids: torch.Tensor
    ) -> str | None:
        if type(head) is not nn.Linear:
            return f"it is a {type(head).__name__}, not a plain nn.Linear"
        if self._sharded() or head.weight.numel() == 0:
            return "its weight is sharded (FSDP / ZeRO-3)"
        if getattr(model, "find_unused_parameters", False) and not getattr(
            model, "static_graph", False
        ):  # DDP would mark the head unused at forward, then see its gradient twice
            return "DDP find_unused_parameters=True"
        if parent_of(unwrapped, head) is None:
            return "it is not a submodule of the model"
        return _probe(unwrapped, head, ids) if self._probe else None


def score_masked(
    model: nn.Module,
    head: nn.Linear | None,
    inputs: torch.Tensor,
    clean: torch.Tensor,
    masked: torch.Tensor,
    scale: torch.Tensor,
    source: Callable[[torch.Tensor], torch.Tensor],
    chunk_rows: int,
    **forward: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of scale * CE over masked positions, per-masked-token CE for metrics).

    `inputs` is what the model reads ([b, l], or block diffusion's [b, 2l] layout) with
    its `forward` kwargs (attention mask, positions; packed rows' per-example attention);
    `clean`, `masked` and `scale` are [b, l]. `source(cols)` gives the output columns that score the masked columns (the
    columns themselves; one to the left for right-shifted models). With `head` None the
    model's full logits are computed and the CE taken at the same rows. The CE comes back
    in the order of `masked.nonzero()`, so per-row sums follow from its row indices.
    """
    rows, cols = masked.nonzero(as_tuple=True)
    src_cols = source(cols)
    targets = clean[rows, cols]
    token_scale = scale[rows, cols].to(torch.float32)
    if head is None:
        logits = model(input_ids=inputs, **forward).logits
        picked = logits[rows, src_cols]
        del logits  # backward needs only the picked rows: free [b, l, V] now
        return full_logits_cross_entropy(picked, targets, token_scale)
    with swapped_head(model, head) as head_inputs:
        hidden = model(input_ids=inputs, **forward).logits
    if len(head_inputs) != 1 or not is_head_input(head_inputs[0], hidden):
        raise RuntimeError(
            "score_masked_only: the model's output is not its head's input although the "
            "first check passed; set score_masked_only to false"
        )
    return chunked_linear_cross_entropy(
        hidden[rows, src_cols], head.weight, head.bias, targets, token_scale,
        head_chunk_rows(head, chunk_rows),
    )  # fmt: skip


def head_chunk_rows(head: nn.Linear, requested: int) -> int:
    """Rows per chunk of the chunked CE: at most `requested`, within the block budget."""
    budget_rows = max(_BLOCK_VALUES // head.out_features, head.in_features // 8)
    return max(1, min(requested, budget_rows))
