"""Answer accuracy: normalised exact match and token F1 of sampled answers.

The normalisation is SQuAD's (lower case, no punctuation, no articles, single spaces),
so "Paris." and "paris" match and a wordy answer still earns partial F1 credit. The
answers come from the method's sampler (preview.py's `answer`), greedy, with the preview
settings, so they are what a user of the model would see.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..methods import Method
from ..models.families import TokenIds
from ..preview import PreviewPrompt, answer, sampling_config

logger = logging.getLogger(__name__)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalised words (as a multiset); two empty answers match."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class Accuracy:
    """Mean exact match and token F1 over `n` answers, and the answers themselves."""

    exact_match: float
    token_f1: float
    n: int
    answers: tuple[str, ...]

    def metrics(self) -> dict[str, float]:
        return {"exact_match": self.exact_match, "token_f1": self.token_f1}

    def describe(self) -> str:
        return (
            f"exact match {self.exact_match:.3f}, token F1 {self.token_f1:.3f} ({self.n} answers)"
        )


def score_answers(answers: Sequence[str], references: Sequence[str]) -> Accuracy:
    if len(answers) != len(references) or not answers:
        raise ValueError("need one reference per answer, and at least one answer")
    pairs = list(zip(answers, references, strict=True))
    return Accuracy(
        exact_match=sum(exact_match(a, r) for a, r in pairs) / len(pairs),
        token_f1=sum(token_f1(a, r) for a, r in pairs) / len(pairs),
        n=len(pairs),
        answers=tuple(answers),
    )


def answer_accuracy(
    model: Any,
    tokenizer: Any,
    ids: TokenIds,
    method: Method,
    prompts: Sequence[PreviewPrompt],
    max_new_tokens: int,
    block_size: int | None = None,
) -> Accuracy:
    """Generate an answer to each prompt with the method's sampler and score it
    (`block_size`: block diffusion's trained block size)."""
    config = sampling_config(max_new_tokens, block_size=block_size)
    answers = [answer(model, tokenizer, ids, method, p.messages, config) for p in prompts]
    return score_answers(answers, [p.reference for p in prompts])


def describe_sampler(
    method: Method, n: int, max_new_tokens: int, block_size: int | None = None
) -> str:
    """The settings the accuracy answers are generated with (logged once per job)."""
    config = sampling_config(max_new_tokens, block_size=block_size)
    return (
        f"answer accuracy on {n} held-out examples: {method.sampler.split(':')[1]}, "
        f"{config.algorithm}, greedy, {config.max_new_tokens} new tokens, {config.steps} steps, "
        f"blocks of {config.block_size}"
    )
