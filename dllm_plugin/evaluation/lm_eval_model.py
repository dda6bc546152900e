"""The `dllm` model type for lm-evaluation-harness (registered when this module is imported).

    --model dllm --model_args pretrained=PATH[,adaptor=PATH][,mc_samples=N,mc_batch=N,seed=N]

loads a base model, a base model plus a LoRA adaptor (not merged) or a full fine-tune of
any family, and answers lm-eval's three request types with our own code:

- `loglikelihood(context, continuation)`: minus the held-out ELBO estimator's NLL bound of
  the continuation tokens given the context (elbo.py: `mc_samples` stratified draws, keyed
  by `seed` and the tokens, so a fixed seed gives the same numbers in any request order);
  `is_greedy` is always False (a diffusion model has no left-to-right greedy answer);
- `loglikelihood_rolling(text)`: the same bound over lm-eval's rolling windows of the text;
- `generate_until(context, gen_kwargs)`: the method's sampler, `max_gen_toks` new tokens
  (default `max_new_tokens`), one token per step unless `steps` is given, cut at the first
  stop string of `until`.

A model trained with block diffusion (its diffusion_recipe.json says bd3lm) is scored with
the block-diffusion bound and sampled block by block, both with its trained block size.

A sequence is the tokenizer's own special-token wrapping around context + continuation
(BERT: [CLS] ... [SEP]); a context that already starts with it (a rendered chat template)
is not wrapped twice.

lm-eval's CLI cannot find a model type outside its package: run it through
`python -m dllm_plugin.evaluation.lm_eval_cli` (a separate module, so that this class is
registered once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import lm_eval.models  # noqa: F401  lm-eval's own types stay resolvable once ours is registered
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..diffusion.loss import IGNORE_INDEX
from ..diffusion.masked_head import HeadVerdict
from ..errors import ModelError
from ..methods import Method
from ..models.families import TokenIds
from ..sampling import SamplingConfig
from .elbo import Row, estimate_rows, has_bound

logger = logging.getLogger(__name__)

MODEL_TYPE = "dllm"
_NO_CONTEXT = -1  # the dummy first-window context of get_rolling_token_windows


@dataclass(frozen=True)
class Loaded:
    """A model ready to score and sample, with what the method needs."""

    model: Any
    tokenizer: Any
    ids: TokenIds
    method: Method
    name: str = ""
    block_size: int | None = None  # block diffusion: the block size it was trained with


@register_model(MODEL_TYPE)
class DiffusionLM(LM):
    """A diffusion LM of any family and method, as lm-eval sees a model."""

    def __init__(
        self,
        pretrained: str | None = None,
        adaptor: str | None = None,
        method: str = "auto",
        mc_samples: int = 32,
        mc_batch: int = 32,
        seed: int = 1234,
        max_new_tokens: int = 256,
        steps: int | None = None,
        block_size: int = 32,  # MDLM sampling; block diffusion uses its trained size
        max_length: int | None = None,
        device: str | None = None,
        loaded: Loaded | None = None,
        **harness_args: Any,  # batch_size, max_batch_size: lm-eval passes them to every model
    ):
        super().__init__()
        if loaded is None:
            if not pretrained:
                raise ValueError("model_args needs pretrained=PATH (a model folder or hub id)")
            from ..generate import load_weights, prepare_generation

            adaptor = str(adaptor) if adaptor else None
            setup = prepare_generation(str(pretrained), adaptor, str(method))
            model = load_weights(setup, adaptor, _usable_device(device))
            trained = setup.trained_block_size
            block = setup.method.sampling_block_size(trained) if trained else None
            loaded = Loaded(model, setup.tokenizer, setup.ids, setup.method, str(pretrained), block)
        self.loaded = loaded
        self._device = next(loaded.model.parameters()).device
        self.mc_samples = int(mc_samples)
        self.mc_batch = int(mc_batch)
        self.seed = int(seed)
        self.max_new_tokens = int(max_new_tokens)
        self.steps = int(steps) if steps else None
        self.block_size = loaded.block_size or int(block_size)
        self.max_length = int(max_length) if max_length else _model_max_length(loaded.model)
        if loaded.block_size:  # block diffusion fills rows to whole blocks
            self.max_length -= self.max_length % loaded.block_size
        self.adaptor = str(adaptor) if adaptor else None
        self._prefix, self._suffix = _special_wrapping(loaded.tokenizer)
        self._verdict = HeadVerdict(lambda m: m, lambda: False)

    # ---- lm-eval's request types ------------------------------------------------------
    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        rows = [self._row(*self._encode_pair(*r.args)) for r in requests]
        return [(-bound.nll, False) for bound in self._bounds(rows)]

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        width = self.max_length - len(self._prefix) - len(self._suffix)
        rows, owner = [], []
        for i, request in enumerate(requests):
            tokens = self._encode(request.args[0])
            for window in get_rolling_token_windows(tokens, _NO_CONTEXT, width, 1):
                context, predicted = make_disjoint_window(window)
                rows.append(self._row([t for t in context if t != _NO_CONTEXT], predicted))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, bound in zip(owner, self._bounds(rows), strict=True):
            totals[i] -= bound.nll
        return totals

    def generate_until(self, requests: list[Any]) -> list[str]:
        return [self._generate(*r.args) for r in requests]

    # ---- chat templates (--apply_chat_template) ---------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.loaded.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.loaded.tokenizer, "chat_template", None)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.loaded.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def get_model_info(self) -> dict[str, Any]:
        return {
            "model": self.loaded.name,
            "adaptor": self.adaptor,
            "method": self.loaded.method.name,
            "mc_samples": self.mc_samples,
            "seed": self.seed,
        }

    # ---- scoring ------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return list(self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens, split where the whole text's tokens split
        (trailing spaces of the context go to the continuation, as lm-eval's own models)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        context_ids = self._encode(context) if context else []
        return whole[: len(context_ids)], whole[len(context_ids) :]

    def _row(self, context: list[int], continuation: list[int]) -> Row:
        """prefix + context + continuation + suffix, only the continuation scored; the
        context loses its oldest tokens when the row is longer than max_length."""
        prefix = [] if context[: len(self._prefix)] == self._prefix else self._prefix
        room = self.max_length - len(prefix) - len(self._suffix) - len(continuation)
        context = context[max(0, len(context) - max(room, 0)) :]
        input_ids = [*prefix, *context, *continuation, *self._suffix]
        labels = [IGNORE_INDEX] * (len(prefix) + len(context))
        labels += continuation + [IGNORE_INDEX] * len(self._suffix)
        return Row(input_ids, labels)

    def _bounds(self, rows: list[Row]) -> list[Any]:
        if not has_bound(self.loaded.method.trainer_class()):
            raise ModelError(
                f"loglikelihood: {self.loaded.method.title} has no masked-diffusion ELBO to "
                "score answers with; evaluate it on generate_until tasks"
            )
        return estimate_rows(
            self.loaded.model,
            self.loaded.method.bound_scorer(self.loaded.block_size),
            rows,
            self.loaded.ids,
            mc_samples=self.mc_samples,
            seed=self.seed,
            batch_size=self.mc_batch,
            verdict=self._verdict,
        )

    # ---- generation -----------------------------------------------------------------------
    def _generate(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        n = int(gen_kwargs.get("max_gen_toks") or self.max_new_tokens)
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        if not gen_kwargs.get("do_sample", temperature > 0):
            temperature = 0.0
        context_ids = self._encode(context)
        prefix = [] if context_ids[: len(self._prefix)] == self._prefix else self._prefix
        prompt = [*prefix, *context_ids][-max(self.max_length - n, 1) :]
        config = SamplingConfig(
            max_new_tokens=n,
            steps=self.steps or n,
            block_size=self.loaded.block_size or (min(self.block_size, n) if n else 1),
            temperature=temperature,
            seed=self.seed,
        )
        ids = self.loaded.ids
        tokens = self.loaded.method.sampler_function()(
            self.loaded.model,
            [prompt],
            mask_id=ids.mask_id,
            stop_ids=ids.stop_ids,
            pad_id=ids.pad_id,
            config=config,
        )[0]
        text = self.loaded.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in until:
            text = text.split(stop, 1)[0]
        return text


def _usable_device(device: str | None) -> str:
    """lm-eval's CLI asks for cuda:0 unless told otherwise: fall back to the CPU."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        return "cpu"
    return str(device)


def _model_max_length(model: Any) -> int:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "max_sequence_length", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return min(value, 4096)
    return 2048


def _special_wrapping(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (BERT: [CLS], [SEP];
    most causal-LM tokenizers: a BOS or nothing)."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    wrapped = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(wrapped) - len(plain) + 1):
        if wrapped[start : start + len(plain)] == plain:
            return wrapped[:start], wrapped[start + len(plain) :]
    return [], []
