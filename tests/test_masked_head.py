"""Masked-only scoring (`score_masked_only`) equals the full-logits path, and saves memory.

The trainer's optimised path runs the model with its vocabulary head swapped for a
pass-through and applies the head + CE only at masked rows, in chunks. It must give the
same loss and gradients as model(...).logits + CE on the same noise draws, for every head
layout it accepts (BERT-family MLM heads, LLaDA `ff_out`, Dream `lm_head`, LoRA, 4-bit,
autocast, DDP), fall back with one log line where the head cannot be separated, and never
create a [b, l, V] tensor.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import shared_fixture, tiny_bert_mlm
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import (
    DistilBertConfig,
    DistilBertForMaskedLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    RobertaConfig,
    RobertaForMaskedLM,
)
from transformers.modeling_outputs import MaskedLMOutput

from dllm_plugin.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM
from dllm_plugin.trainers import (
    DreamTrainer,
    DreamTrainingArguments,
    MDLMTrainer,
    MDLMTrainingArguments,
)

V = 97  # tiny vocabulary: ids 0..3 are pad, bos, eos, mask
PAD, BOS, MASK = 0, 1, 3
FP32 = {"rtol": 1e-5, "atol": 1e-6}

Result = tuple[torch.Tensor, dict[str, torch.Tensor]]


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Tiny matmuls gain nothing from threads; on a busy 2-core box they only add jitter."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- helpers


def make_batch(b: int = 3, length: int = 20, prompt: int = 6, seed: int = 0) -> dict:
    """Right-padded prompt-masked rows as the SFT collator makes them (padding trained)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (b, length), generator=gen)
    ids[0, -4:] = PAD  # padding keeps real labels (the pad id)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "labels": labels}


def make_trainer(model: nn.Module, tmp: Path, dream: bool = False, **kw) -> MDLMTrainer:
    args_cls, trainer_cls = (
        (DreamTrainingArguments, DreamTrainer) if dream else (MDLMTrainingArguments, MDLMTrainer)
    )
    args = args_cls(output_dir=str(tmp), report_to=[], use_cpu=True, **kw)
    return trainer_cls(model=model, args=args, mask_token_id=MASK, bos_token_id=BOS)


def run_path(
    trainer: MDLMTrainer, model: nn.Module, batch: dict, masked_only: bool, wrap=None
) -> Result:
    """compute_loss + backward at global step 0 with the noise stream reset.

    `_micro_step = (-1, 0)` makes the next call the step's first micro-batch again, so
    both paths draw the same timesteps and masks; reseeding the process RNG gives both
    the same dropout masks (LoRA dropout).
    """
    trainer.args.score_masked_only = masked_only
    trainer._micro_step = (-1, 0)
    torch.manual_seed(1234)
    model.zero_grad(set_to_none=True)
    with wrap() if wrap else torch.enable_grad():
        loss = trainer.compute_loss(model, batch)
    loss.backward()
    assert trainer._metrics["train"]["masked_tokens"][-1] > 0
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def both_paths(trainer: MDLMTrainer, model: nn.Module, batch: dict, wrap=None) -> tuple:
    model.train()
    return (
        run_path(trainer, model, batch, True, wrap),
        run_path(trainer, model, batch, False, wrap),
    )


def assert_same(opt: Result, full: Result, rtol: float, atol: float) -> None:
    (loss_o, grads_o), (loss_f, grads_f) = opt, full
    torch.testing.assert_close(loss_o, loss_f, rtol=rtol, atol=atol)
    assert grads_o.keys() == grads_f.keys() and grads_f
    for name in grads_f:
        torch.testing.assert_close(grads_o[name], grads_f[name], rtol=rtol, atol=atol, msg=name)


def _bert() -> nn.Module:
    return tiny_bert_mlm(V)


def _roberta() -> nn.Module:
    cfg = RobertaConfig(
        vocab_size=V,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        pad_token_id=PAD,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return RobertaForMaskedLM(cfg)


def _distilbert() -> nn.Module:
    cfg = DistilBertConfig(
        vocab_size=V, dim=16, n_layers=1, n_heads=2, hidden_dim=32, dropout=0.0,
        attention_dropout=0.0, max_position_embeddings=64, pad_token_id=PAD,
    )  # fmt: skip
    return DistilBertForMaskedLM(cfg)


def _modernbert() -> nn.Module:
    cfg = ModernBertConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS,
        eos_token_id=2, cls_token_id=BOS, sep_token_id=2, sparse_prediction=True,
    )  # fmt: skip
    return ModernBertForMaskedLM(cfg)


def _llada(vocab: int = V, d: int = 16) -> nn.Module:
    cfg = LLaDAConfig(
        d_model=d, n_heads=2, n_kv_heads=2, n_layers=1, mlp_hidden_size=2 * d,
        vocab_size=vocab, embedding_size=vocab, max_sequence_length=128,
        pad_token_id=PAD, eos_token_id=2, mask_token_id=MASK,
    )  # fmt: skip
    return LLaDAModelLM(cfg)


def _dream() -> nn.Module:
    cfg = DreamConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2, mask_token_id=MASK,
    )  # fmt: skip
    return DreamModel(cfg)


def _randomise_biases(model: nn.Module) -> nn.Module:
    """Non-zero biases and norm scales, so a dropped head bias or transform would show."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                param.normal_(mean=1.0 if "norm" in name.lower() else 0.0, std=0.1)
    return model


# ------------------------------------------------------------------- equality per family

FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "bert": _bert,
    "roberta": _roberta,
    "distilbert": _distilbert,
    "modernbert": _modernbert,
    "llada": _llada,
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_masked_path_equals_full_logits(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _randomise_biases(FAMILIES[family]())
    trainer = make_trainer(model, tmp_path)
    opt, full = both_paths(trainer, model, make_batch())
    assert_same(opt, full, **FP32)
    if family != "modernbert":  # ModernBERT may fall back (sparse prediction); still equal
        assert trainer.head_verdict.reason is None, trainer.head_verdict.reason


@pytest.mark.parametrize("prompt", [6, 0], ids=["prompt-masked", "bos-prepended"])
def test_dream_shifted_cart_equals_full_logits(prompt: int, tmp_path: Path) -> None:
    """Dream scores position i with the output at i-1; prompt 0 also exercises the BOS."""
    torch.manual_seed(0)
    model = _randomise_biases(_dream())
    trainer = make_trainer(model, tmp_path, dream=True)
    opt, full = both_paths(trainer, model, make_batch(prompt=prompt))
    assert_same(opt, full, **FP32)
    assert trainer.head_verdict.reason is None


def test_llada_fixture_with_gradient_checkpointing(tmp_path: Path) -> None:
    """The real tiny-LLaDA checkpoint, with checkpointing on as models/loading.py enables it."""
    from dllm_plugin.models.loading import LoadOptions, load_model

    folder = shared_fixture("tiny-llada")
    loaded = load_model(str(folder), "llada", LoadOptions(gradient_checkpointing=True))
    model = loaded.model
    assert model.is_gradient_checkpointing
    trainer = make_trainer(model, tmp_path)
    batch = make_batch(length=24)
    opt, full = both_paths(trainer, model, batch)
    assert_same(opt, full, **FP32)
    model.gradient_checkpointing_disable()
    assert_same(opt, run_path(trainer, model, batch, True), **FP32)


def test_lora_equals_full_logits(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = _randomise_biases(_llada())
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # LoRA B starts at zero: make the adaptor matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    trainer = make_trainer(model, tmp_path)
    opt, full = both_paths(trainer, model, make_batch())
    assert_same(opt, full, **FP32)
    assert trainer.head_verdict.reason is None
    assert all("lora_" in name for name in opt[1])  # the frozen head got no gradient


def test_4bit_lora_equals_full_logits(tmp_path: Path) -> None:
    from dllm_plugin.errors import ModelError
    from dllm_plugin.models.loading import LoadOptions, check_bitsandbytes, load_model

    try:
        check_bitsandbytes()
    except ModelError as e:
        pytest.skip(f"bitsandbytes cannot quantise here: {e}")
    opts = LoadOptions(dtype="float32", load_in_4bit=True, lora=True, lora_r=4, lora_alpha=8)
    model = load_model(str(shared_fixture("tiny-llada")), "llada", opts).model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    trainer = make_trainer(model, tmp_path)
    opt, full = both_paths(trainer, model, make_batch(length=24))
    assert_same(opt, full, rtol=1e-4, atol=1e-5)
    assert trainer.head_verdict.reason is None


def test_bf16_autocast_close_to_full_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _randomise_biases(_llada())
    trainer = make_trainer(model, tmp_path)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    opt, full = both_paths(trainer, model, make_batch(), wrap=autocast)
    assert_same(opt, full, rtol=3e-2, atol=3e-3)


class _Rows(torch.utils.data.Dataset):
    """The rows of make_batch() as a dataset for Trainer.train."""

    def __init__(self, batch: dict) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": self.batch["input_ids"][i].tolist(),
            "labels": self.batch["labels"][i].tolist(),
            "prompt_len": 6,
        }


@pytest.mark.parametrize("family", ["bert", "llada"])
def test_trainer_bf16_runs_the_masked_head_and_matches_full_logits(
    family: str, tmp_path: Path
) -> None:
    """Through Trainer.train with bf16=True (accelerate autocasts only model.forward): the
    loss runs under the same autocast, so the probe accepts the head (BERT's bf16 head
    input comes back upcast to fp32) and the first step's loss equals the full-logits one."""
    losses = {}
    for masked_only in (True, False):
        torch.manual_seed(0)
        model = _randomise_biases(FAMILIES[family]())
        args = MDLMTrainingArguments(
            output_dir=str(tmp_path / str(masked_only)), report_to=[], use_cpu=True, bf16=True,
            per_device_train_batch_size=3, max_steps=1, logging_steps=1, save_strategy="no",
            score_masked_only=masked_only, disable_tqdm=True,
        )  # fmt: skip
        trainer = MDLMTrainer(
            model=model, args=args, train_dataset=_Rows(make_batch()),
            data_collator=MDLMTrainer.padded_collator(PAD, None), mask_token_id=MASK,
        )  # fmt: skip
        trainer.train()
        if masked_only:
            assert trainer.head_verdict.reason is None, trainer.head_verdict.reason
        losses[masked_only] = trainer.state.log_history[0]["loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "ddp_kwargs",
    [{}, {"static_graph": True}, {"find_unused_parameters": True}],
    ids=["default", "static-graph", "find-unused"],
)
def test_ddp_wrapped_model_equals_full_logits(ddp_kwargs: dict, tmp_path: Path) -> None:
    """Single-process gloo DDP: the swap reaches inside the wrapper and the reducer's hooks
    see every gradient, the head's included (produced outside the module call). With
    find_unused_parameters DDP would count the head unused, so the trainer falls back."""
    import torch.distributed as dist

    torch.manual_seed(0)
    model = _randomise_biases(_llada())
    trainer = make_trainer(model, tmp_path)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        ddp = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
        ddp.train()
        for _ in range(2):  # static_graph behaves differently in its first iteration
            opt = run_path(trainer, ddp, make_batch(), True)
            full = run_path(trainer, ddp, make_batch(), False)
            assert_same(opt, full, **FP32)
    finally:
        dist.destroy_process_group()
    assert any("ff_out" in name for name in opt[1])
    falls_back = "find_unused_parameters" in ddp_kwargs
    assert (trainer.head_verdict.reason is not None) == falls_back


# ----------------------------------------------------------------------------- fallbacks


class ScaledLogitsLLaDA(LLaDAModelLM):
    """A model that post-processes the head's output (like logit scaling or soft-capping)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


class FunctionalHeadLLaDA(LLaDAModelLM):
    """A model that applies the head's weight functionally, never calling the module."""

    def forward(self, input_ids=None, **kwargs):
        hidden, _ = self.model(input_ids, None, None, None, False)
        head = self.model.transformer.ff_out
        return MaskedLMOutput(logits=nn.functional.linear(hidden, head.weight))


@pytest.mark.parametrize("model_cls", [ScaledLogitsLLaDA, FunctionalHeadLLaDA])
def test_inseparable_head_falls_back_with_one_log_line(
    model_cls: type, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    model = model_cls(_llada().config)
    trainer = make_trainer(model, tmp_path)
    with caplog.at_level(logging.WARNING, logger="dllm_plugin.trainers"):
        opt, full = both_paths(trainer, model, make_batch())
        run_path(trainer, model, make_batch(), True)
    assert_same(opt, full, **FP32)
    assert trainer.head_verdict.reason is not None
    lines = [r for r in caplog.records if "cannot be run separately" in r.getMessage()]
    assert len(lines) == 1


def test_probe_restores_train_and_eval_flags(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _bert()
    model.train()
    model.bert.embeddings.eval()  # a deliberately frozen part must stay in eval
    trainer = make_trainer(model, tmp_path)
    trainer.args.score_masked_only = True
    trainer.compute_loss(model, make_batch())
    assert model.training and model.bert.encoder.training
    assert not model.bert.embeddings.training


# ---------------------------------------------------------------------------- memory


class _LargestAllocation(TorchDispatchMode):
    """Records the largest storage (in elements) of any tensor an op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.element_size() > 0:
                elements = t.untyped_storage().nbytes() // t.element_size()
                self.largest = max(self.largest, elements, t.numel())
        return out


@pytest.mark.parametrize("masked_only", [True, False], ids=["masked-only", "full-logits"])
def test_masked_path_never_allocates_full_logits(masked_only: bool, tmp_path: Path) -> None:
    b, length, vocab, d, chunk = 2, 64, 50_000, 16, 16
    torch.manual_seed(0)
    model = _llada(vocab=vocab, d=d)
    trainer = make_trainer(model, tmp_path, head_chunk_size=chunk)
    trainer.args.score_masked_only = masked_only
    batch = make_batch(b=b, length=length, prompt=8)
    trainer.compute_loss(model, batch)  # the one-off head check runs outside the measurement
    model.zero_grad(set_to_none=True)
    recorder = _LargestAllocation()
    with recorder:
        trainer.compute_loss(model, batch).backward()
    if masked_only:
        assert recorder.largest < b * length * vocab
        assert recorder.largest <= max(chunk, d) * vocab  # one chunk, or the [V, d] gradient
    else:
        assert recorder.largest >= b * length * vocab


# ------------------------------------------------------- the other performance options


def test_group_by_length_needs_no_length_column(tmp_path: Path) -> None:
    """train_sampling_strategy="group_by_length" (the group_by_length parameter) infers the
    lengths from input_ids, so the tokenised datasets need no extra `length` column."""
    import datasets
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from dllm_plugin.data.collators import MDLMCollator

    lengths = [5, 17, 9, 30, 12, 7, 21, 3]
    rows = [
        {
            "input_ids": list(range(4, 4 + n)),
            "labels": [-100] + list(range(5, 4 + n)),
            "prompt_len": 1,
        }
        for n in lengths
    ]
    args = MDLMTrainingArguments(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=2,
        train_sampling_strategy="group_by_length",
    )
    trainer = MDLMTrainer(
        model=_llada(),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=MDLMCollator(pad_token_id=PAD),
        mask_token_id=MASK,
    )
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    assert sampler.lengths == lengths
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 2
