"""What the check trains: the family registry, the training modes and the run plans.

`WORKLOADS` has one row per family: how to build its model from a config at any shape
(with the family's real vocabulary and special-token ids), which method of
`dllm_plugin.methods` trains it, the sizes the check runs and the released shape it
plans memory for. A new family or method (a2d conversions, BD3LM, DiffusionGemma, ...)
is one more row here: nothing else in `gpu_check` asks which family it is running.

`MODES` has one row per training set-up (precision, LoRA, 4-bit, gradient
checkpointing, masked head); `plan_runs` picks the (family, size, mode) runs of a plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MODES",
    "PLANS",
    "WORKLOADS",
    "Mode",
    "Plan",
    "RunPlan",
    "Shape",
    "SpecialIds",
    "Workload",
    "plan_runs",
]


@dataclass(frozen=True)
class Shape:
    """The transformer geometry the check varies; everything else is the family's."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int  # the MLP's inner width


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the trainers need: the mask id, the pad (= EOS) id and BOS."""

    mask: int
    pad: int
    bos: int | None


TINY_VOCAB = 512
# Tiny models put the special tokens at the top of their 512-token vocabulary.
TINY_IDS = SpecialIds(mask=TINY_VOCAB - 1, pad=TINY_VOCAB - 2, bos=TINY_VOCAB - 3)


@dataclass(frozen=True)
class Workload:
    """One family: how to build its models and which method trains them."""

    family: str  # a key of models/families.py FAMILIES
    method: str  # a key of methods.py METHODS: its Trainer trains every run of this row
    label: str  # shown in the table
    make_config: Callable[[Shape, int, SpecialIds], Any]  # (shape, vocab, ids) -> config
    vocab: int  # the real vocabulary size
    ids: SpecialIds  # the real special-token ids
    sizes: dict[str, Shape]  # size name -> shape: "tiny", "tiny-2", "small", "1b"
    plan_name: str | None = None  # the released model memory is planned for
    plan_shape: Shape | None = None
    plan_max_length: int = 4096  # the longest max_length the plan table lists
    # Token strings of the tiny models' character tokenizer by role (mask at TINY_IDS.mask,
    # eos/sep at TINY_IDS.pad, bos/cls at TINY_IDS.bos): the launcher check runs a real
    # job (tokenizer, chat template, data) on the "tiny-2" model. Empty: no launcher check.
    tiny_tokens: dict[str, str] = field(default_factory=dict)

    def tiny_tokenizer(self) -> Any:
        """The character tokenizer of this family's tiny models."""
        from .tokenizer import char_tokenizer

        slot = {"mask_token": TINY_IDS.mask, "eos_token": TINY_IDS.pad, "sep_token": TINY_IDS.pad}
        slot.update(bos_token=TINY_IDS.bos, cls_token=TINY_IDS.bos)
        specials = {token: slot[role] for role, token in self.tiny_tokens.items()}
        return char_tokenizer(specials, **self.tiny_tokens)

    def config(self, size: str) -> Any:
        """The model config of one size; tiny sizes use the tiny vocabulary."""
        vocab, ids = (TINY_VOCAB, TINY_IDS) if size.startswith("tiny") else (self.vocab, self.ids)
        return self.make_config(self.sizes[size], vocab, ids)

    def plan_config(self) -> Any:
        return self.make_config(self.plan_shape, self.vocab, self.ids)

    def special_ids(self, size: str) -> SpecialIds:
        return TINY_IDS if size.startswith("tiny") else self.ids


# ---- model configs per family -------------------------------------------------------------
def bert_config(shape: Shape, vocab: int, ids: SpecialIds) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.mlp,
        max_position_embeddings=4096,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=ids.pad,
    )


def llada_config(shape: Shape, vocab: int, ids: SpecialIds) -> Any:
    from ..models import LLaDAConfig

    return LLaDAConfig(
        d_model=shape.hidden,
        n_layers=shape.layers,
        n_heads=shape.heads,
        n_kv_heads=shape.kv_heads,
        mlp_hidden_size=shape.mlp,
        vocab_size=vocab,
        embedding_size=vocab,
        max_sequence_length=4096,
        mask_token_id=ids.mask,
        pad_token_id=ids.pad,
        eos_token_id=ids.pad,
    )


def dream_config(shape: Shape, vocab: int, ids: SpecialIds) -> Any:
    from ..models import DreamConfig

    return DreamConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.mlp,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        max_window_layers=shape.layers,
        mask_token_id=ids.mask,
        pad_token_id=ids.pad,
        eos_token_id=ids.pad,
        bos_token_id=ids.bos,
    )


# ---- the registry ------------------------------------------------------------------------
# DiffusionGemma has no row yet: its experts are 3-D weights (the body FLOPs and the memory
# model count every parameter as active and plan dense `Shape`s), its rows are filled to
# whole canvases (activations are not linear in `length`), and its collator needs EOS and
# the canvas size, which `SpecialIds` and the padded collator here do not carry.
# Sizes: "tiny"/"tiny-2" (CPU test mode: vocabulary 512), "small" and "1b" (about 1B
# parameters with the real vocabulary). The MLP keeps the released model's ratio to the
# hidden size (LLaDA 3, Dream 5.3, BERT 4), so activations per layer scale as they do there.
WORKLOADS: dict[str, Workload] = {
    "bert": Workload(
        family="bert",
        method="bert",
        label="BERT",
        make_config=bert_config,
        vocab=30522,
        ids=SpecialIds(mask=103, pad=0, bos=101),
        sizes={
            "tiny": Shape(32, 2, 2, 2, 128),
            "tiny-2": Shape(64, 2, 4, 4, 256),
            "small": Shape(256, 4, 4, 4, 1024),
            "1b": Shape(2048, 18, 16, 16, 8192),
        },
        plan_name="BERT-large",
        plan_shape=Shape(1024, 24, 16, 16, 4096),
        plan_max_length=512,  # BERT's position embeddings
        tiny_tokens={"mask_token": "[MASK]", "sep_token": "[SEP]", "cls_token": "[CLS]"},
    ),
    "llada": Workload(
        family="llada",
        method="llada",
        label="LLaDA",
        make_config=llada_config,
        vocab=126464,
        ids=SpecialIds(mask=126336, pad=126081, bos=126080),
        sizes={
            "tiny": Shape(32, 2, 2, 2, 96),
            "tiny-2": Shape(64, 2, 4, 2, 192),
            "small": Shape(256, 4, 4, 4, 768),
            "1b": Shape(2048, 10, 16, 16, 6144),
        },
        plan_name="LLaDA-8B",
        plan_shape=Shape(4096, 32, 32, 32, 12288),
        tiny_tokens={
            "mask_token": "<|mdm_mask|>",
            "eos_token": "<|endoftext|>",
            "bos_token": "<|startoftext|>",
        },
    ),
    "dream": Workload(
        family="dream",
        method="dream",
        label="Dream",
        make_config=dream_config,
        vocab=152064,
        ids=SpecialIds(mask=151666, pad=151643, bos=151665),
        sizes={
            "tiny": Shape(32, 2, 2, 2, 168),
            "tiny-2": Shape(64, 2, 4, 2, 336),
            "small": Shape(256, 4, 4, 2, 1344),
            "1b": Shape(1536, 12, 12, 2, 8960),
        },
        plan_name="Dream-7B",
        plan_shape=Shape(3584, 28, 28, 4, 18944),
        tiny_tokens={
            "mask_token": "<|mask|>",
            "eos_token": "<|endoftext|>",
            "bos_token": "<|beginoftext|>",
        },
    ),
}


# ---- training modes ----------------------------------------------------------------------
@dataclass(frozen=True)
class Mode:
    """One training set-up, as a job would set it (LoadOptions + score_masked_only)."""

    name: str
    dtype: str = "bfloat16"
    lora: bool = False
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    score_masked_only: bool = True
    plan: bool = True  # fitted by the memory model and listed in the fits-in-memory table

    @property
    def trains_all_weights(self) -> bool:
        return not self.lora


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("full"),
        Mode("full+gc", gradient_checkpointing=True),
        Mode("full logits", score_masked_only=False),
        Mode("lora", lora=True),
        Mode("lora+gc", lora=True, gradient_checkpointing=True),
        Mode("4bit lora+gc", lora=True, load_in_4bit=True, gradient_checkpointing=True),
        Mode("4bit lora", lora=True, load_in_4bit=True),
        Mode("full logits+gc", gradient_checkpointing=True, score_masked_only=False),
        # The bf16 runs' reference: same weights, same noise, fp32 end to end.
        Mode("fp32 full", dtype="float32", plan=False),
    )
}


# ---- plans: which runs, how long ---------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """A set of runs: sizes x modes per family, plus the bf16-vs-fp32 pair on `sizes[0]`."""

    name: str
    sizes: tuple[str, ...]  # the first is the small one (bf16 vs fp32 runs on it)
    modes: tuple[str, ...]
    batch: dict[str, int]  # per size
    length: dict[str, int]  # per size: the timed phase; later phases halve it
    steps: int = 6  # optimizer steps at `length` (loss must fall over them)
    extra_phases: int = 2  # then 2 steps at length/2, length/4, ... for the memory fit
    learning_rate: float = 1e-4
    lora_lr_factor: float = 10.0  # LoRA trains few weights from zero: the usual 10x rate
    matmul_size: int = 8192


PLANS: dict[str, Plan] = {
    "default": Plan(
        name="default",
        sizes=("small", "1b"),
        modes=("full", "full+gc", "full logits", "lora", "4bit lora+gc"),
        batch={"small": 8, "1b": 8},
        length={"small": 1024, "1b": 1024},
    ),
    "long": Plan(
        name="long",
        sizes=("small", "1b"),
        modes=(
            "full",
            "full+gc",
            "full logits",
            "full logits+gc",
            "lora",
            "lora+gc",
            "4bit lora",
            "4bit lora+gc",
        ),
        batch={"small": 8, "1b": 8},
        length={"small": 2048, "1b": 2048},
        steps=10,
        extra_phases=3,
    ),
    "tiny": Plan(
        name="tiny",
        sizes=("tiny", "tiny-2"),
        modes=("full", "full+gc", "full logits", "lora"),
        batch={"tiny": 4, "tiny-2": 4},
        length={"tiny": 64, "tiny-2": 64},
        steps=4,
        learning_rate=3e-3,
        lora_lr_factor=1.0,  # 3e-3 is already a LoRA-sized rate; 10x overshoots tiny models
        matmul_size=512,
    ),
}


@dataclass(frozen=True)
class RunPlan:
    """One run: a family at one size in one mode."""

    workload: Workload
    size: str
    mode: Mode

    @property
    def key(self) -> str:
        return f"{self.workload.family}/{self.size}/{self.mode.name}"


def plan_runs(plan: Plan, families: tuple[str, ...], can_4bit: bool) -> list[RunPlan]:
    """Every run of the plan, family by family; 4-bit modes only where bitsandbytes can."""
    runs = []
    for family in families:
        workload = WORKLOADS[family]
        runs.append(RunPlan(workload, plan.sizes[0], MODES["fp32 full"]))
        for size in plan.sizes:
            for name in plan.modes:
                mode = MODES[name]
                if mode.load_in_4bit and not can_4bit:
                    continue
                runs.append(RunPlan(workload, size, mode))
    return runs
