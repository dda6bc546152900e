"""A character-level tokenizer whose special tokens sit at chosen ids.

Tiny models (and the test fixtures) have small vocabularies and no tokenizer of their
own; this one fits them, so the real chat-template, masking and sampling code runs
against them without any download. Built from the `tokenizers` library transformers
already depends on.
"""

from __future__ import annotations

import string
from typing import Any

__all__ = ["char_tokenizer"]


def char_tokenizer(specials: dict[str, int], **special_attrs: str) -> Any:
    """One id per printable ASCII character (0 is `<unk>`), then `specials` at their ids.

    `special_attrs` name the roles (`eos_token="<|endoftext|>"`, `mask_token=...`).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0}
    for ch in " \n" + string.ascii_letters + string.digits + string.punctuation:
        vocab[ch] = len(vocab)
    if max(vocab.values()) >= min(specials.values()):
        raise ValueError(f"special ids must be above the {len(vocab)} character ids: {specials}")
    vocab.update(specials)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **special_attrs)
