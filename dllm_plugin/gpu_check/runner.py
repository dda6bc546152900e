"""Run a few real optimizer steps of one (family, size, mode) through the project's code.

The model is loaded from a folder by `models.loading.load_model` (dtype policy, 4-bit,
LoRA, gradient checkpointing as a job loads it); the method's Trainer
(`methods.METHODS[...]`) trains it with the method's collator, the manifest's loss
defaults and `Trainer.train`'s own loop. Nothing here re-implements a training step.

The data is one batch of synthetic prompt/answer rows repeated: every row is `length`
tokens, the first half the prompt (label -100), the answer ending with EOS. After the
`steps` timed steps, a few steps on rows of half (a quarter, ...) the length give the
memory model more token counts at the same weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from ..config import defaults
from ..methods import method_row
from ..models.loading import LoadOptions, load_model
from ..training_args import method_options
from .measure import make_meter, step_flops, tensor_bytes
from .workloads import Mode, Plan, RunPlan, SpecialIds, Workload

logger = logging.getLogger(__name__)

__all__ = ["Phase", "RunResult", "build_model_folder", "run_once", "synthetic_rows"]

EXTRA_PHASE_STEPS = 2
SEED = 1234


@dataclass
class Phase:
    """Steps at one batch shape: its tokens per step and its peak memory."""

    batch: int
    length: int
    steps: int
    peak_bytes: int | None = None

    @property
    def tokens(self) -> int:
        return self.batch * self.length


@dataclass
class RunResult:
    """What one run measured; `error` set when it could not train."""

    key: str
    family: str
    size: str
    mode: str
    layers: int
    hidden: int
    phases: list[Phase] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    nlls: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    masked_rows: list[float] = field(default_factory=list)  # positions scored per step
    # NLL per masked token of the first batch under one fixed noise draw, before and after
    # training: each training step draws new noise, so its own NLL is too noisy to judge.
    fixed_nll: tuple[float, float] | None = None
    step_times: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    total_params: int = 0
    trainable_params: int = 0
    weight_bytes: int = 0  # the loaded model's parameters and buffers, as stored
    head_fallback: str | None = None  # why score_masked_only fell back to full logits
    skipped: str | None = None  # why it did not train though nothing is wrong (too big here)
    step_s: float | None = None
    tokens_per_s: float | None = None
    step_flops: float | None = None
    mfu: float | None = None
    seconds: float = 0.0  # the whole run: loading, Trainer set-up, steps
    error: str | None = None

    @property
    def peak_bytes(self) -> int | None:
        return max(self.peaks) if self.peaks else None


# ---- model folders ----------------------------------------------------------------------
def build_model_folder(
    workload: Workload, size: str, root: Path, device: torch.device | None = None
) -> Path:
    """A randomly initialised model of this size saved as a checkpoint (bf16 weights).

    Runs load it back through `load_model`, as a job loads a checkpoint. bf16 on disk
    halves the writing; fp32 runs upcast the same values, so all modes start alike.
    Initialising on the GPU (`device`) takes a moment where 1B weights take many on CPU.
    """
    from transformers import AutoModelForMaskedLM

    from .. import models  # noqa: F401  (registers LLaDA and Dream with the Auto classes)

    folder = root / f"{workload.family}-{size}"
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(SEED)
    with torch.device(device or "cpu"):
        model = AutoModelForMaskedLM.from_config(workload.config(size), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    return folder


# ---- data -------------------------------------------------------------------------------
def token_range(vocab: int, ids: SpecialIds) -> tuple[int, int]:
    """Ordinary token ids: above BERT's reserved ones (real vocabularies), below the
    special tokens that sit at the top of LLaDA's, Dream's and the tiny vocabularies."""
    low = 1000 if vocab > 4000 else 0
    above = [i for i in (ids.mask, ids.pad, ids.bos) if i is not None and i >= low]
    return low, min(above, default=vocab)


def synthetic_rows(batch: int, length: int, vocab: int, ids: SpecialIds) -> list[dict]:
    """`batch` rows of `length` tokens: prompt half (label -100), answer ending with EOS."""
    gen = torch.Generator().manual_seed(SEED + length)
    low, high = token_range(vocab, ids)
    prompt = length // 2
    rows = []
    for _ in range(batch):
        tokens = torch.randint(low, high, (length,), generator=gen).tolist()
        tokens[-1] = ids.pad  # EOS (= the pad id) ends the answer
        rows.append(
            {"input_ids": tokens, "labels": [-100] * prompt + tokens[prompt:], "prompt_len": prompt}
        )
    return rows


def phases_of(plan: Plan, size: str) -> list[Phase]:
    batch, length = plan.batch[size], plan.length[size]
    phases = [Phase(batch, length, plan.steps)]
    for i in range(1, plan.extra_phases + 1):
        phases.append(Phase(batch, max(length >> i, 8), EXTRA_PHASE_STEPS))
    return phases


# ---- one run ----------------------------------------------------------------------------
class StepProbe(TrainerCallback):
    """Times each optimizer step and has the meter note its peak memory."""

    def __init__(self, meter: Any) -> None:
        self.meter = meter
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.meter.step_begin()
        self._start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.meter.sync()
        self.times.append(time.perf_counter() - self._start)
        self.meter.step_end()


def load_options(mode: Mode) -> LoadOptions:
    """The mode as a job's LoadOptions, LoRA settings at the manifest's defaults."""
    params = defaults()
    return LoadOptions(
        dtype=mode.dtype,
        load_in_4bit=mode.load_in_4bit,
        lora=mode.lora,
        lora_r=params["lora_r"],
        lora_alpha=params["lora_alpha"],
        lora_dropout=params["lora_dropout"],
        lora_target_modules=params["lora_target_modules"],
        gradient_checkpointing=mode.gradient_checkpointing,
    )


def build_trainer(
    run: RunPlan, model: Any, rows: list[dict], device: torch.device, plan: Plan, out: str
) -> Any:
    """The method's Trainer, arguments as a job would set them for this mode."""
    method = method_row(run.workload.method)
    trainer_cls = method.trainer_class()
    params = defaults()
    job = SimpleNamespace(params=params, **params)
    arguments = trainer_cls.arguments_class
    options = method_options(job, method, arguments)
    options["score_masked_only"] = run.mode.score_masked_only
    args = arguments(
        output_dir=out,
        report_to=[],
        use_cpu=device.type == "cpu",
        bf16=run.mode.dtype == "bfloat16",
        per_device_train_batch_size=plan.batch[run.size],
        gradient_accumulation_steps=1,
        max_steps=len(rows) // plan.batch[run.size],
        learning_rate=plan.learning_rate * (plan.lora_lr_factor if run.mode.lora else 1.0),
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=params["max_grad_norm"],
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        seed=SEED,
        data_seed=SEED,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        disable_tqdm=True,
        **options,
    )
    ids = run.workload.special_ids(run.size)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=trainer_cls.padded_collator(ids.pad, job),
        mask_token_id=ids.mask,
        bos_token_id=ids.bos,
    )
    trainer.remove_callback(PrinterCallback)  # the table is the output, not per-step logs
    return trainer


def run_once(
    run: RunPlan, folder: Path, plan: Plan, device: torch.device, peak_flops: float
) -> RunResult:
    """Load, train the planned steps, measure; errors (OOM included) are recorded."""
    shape = run.workload.sizes[run.size]
    result = RunResult(
        run.key, run.workload.family, run.size, run.mode.name, shape.layers, shape.hidden
    )
    result.phases = phases_of(plan, run.size)
    started = time.perf_counter()
    meter = make_meter(device)
    meter.run_begin()
    trainer = loaded = None
    try:
        loaded = load_model(str(folder), run.workload.family, load_options(run.mode))
        vocab = run.workload.config(run.size).vocab_size
        ids = run.workload.special_ids(run.size)
        rows = [
            row
            for phase in result.phases
            for _ in range(phase.steps)
            for row in synthetic_rows(phase.batch, phase.length, vocab, ids)
        ]
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as out:
            trainer = build_trainer(run, loaded.model, rows, device, plan, out)
            probe = StepProbe(meter)
            trainer.add_callback(probe)
            first_batch = rows[: result.phases[0].batch]
            before = fixed_noise_nll(trainer, first_batch)
            with meter.recording(trainer.model):
                trainer.train()
            result.fixed_nll = (before, fixed_noise_nll(trainer, first_batch))
        result.total_params, result.trainable_params = loaded.total_params, loaded.trainable_params
        result.weight_bytes = tensor_bytes(trainer.model)
        result.step_times, result.peaks = probe.times, list(meter.peaks)
        read_history(result, trainer.state.log_history)
        if run.mode.score_masked_only:
            result.head_fallback = head_fallback(trainer)
        summarise(result, trainer.model, run.mode.score_masked_only, peak_flops)
    except torch.OutOfMemoryError as e:  # this GPU is too small for the run, not broken
        result.skipped = f"out of memory: {first_line(e)}"
    except Exception as e:  # one failing run must not hide the others
        result.error = f"{type(e).__name__}: {first_line(e)}"
        logger.exception("run %s failed", run.key)
    finally:
        del trainer, loaded
        meter.run_begin()  # frees what the run held before the next one starts
    result.seconds = time.perf_counter() - started
    return result


def fixed_noise_nll(trainer: Any, rows: list[dict]) -> float:
    """NLL per masked token of `rows` under the evaluation noise, which is keyed by the
    row alone: the same masks before and after training."""
    return float(trainer.evaluate(eval_dataset=rows)["eval_nll"])


def head_fallback(trainer: Any) -> str | None:
    """Why the trainer scored with full logits although asked not to (None: it did not)."""
    verdict = getattr(trainer, "head_verdict", None)
    if verdict is None:
        return None  # a method without a separate head path
    try:
        return verdict.reason
    except RuntimeError:
        return "no batch was scored"


def read_history(result: RunResult, history: list[dict]) -> None:
    """Per-step loss, NLL per masked token and gradient norm from the Trainer's logs."""
    steps = [h for h in history if "loss" in h and "step" in h]
    steps.sort(key=lambda h: h["step"])
    result.losses = [float(h["loss"]) for h in steps]
    result.nlls = [float(h.get("nll", math.nan)) for h in steps]
    result.grad_norms = [float(h.get("grad_norm", math.nan)) for h in steps]
    result.masked_rows = [
        float(h.get("mask_ratio", math.nan)) * maskable
        for h, maskable in zip(steps, _maskable(result), strict=False)
    ]


def _maskable(result: RunResult) -> list[int]:
    """Maskable (answer) positions per step: half of every row."""
    out = []
    for phase in result.phases:
        out += [phase.batch * (phase.length - phase.length // 2)] * phase.steps
    return out


def phase_steps(result: RunResult) -> list[range]:
    """The step indices of each phase."""
    ranges, start = [], 0
    for phase in result.phases:
        ranges.append(range(start, start + phase.steps))
        start += phase.steps
    return ranges


def summarise(result: RunResult, model: Any, masked_only: bool, peak_flops: float) -> None:
    """Step time, tokens/s and MFU of the timed phase; peak memory of every phase.

    The first step is left out of the timing (kernel choice, optimizer state creation)
    and out of the first phase's peak (AdamW creates its states only at its end).
    """
    ranges = phase_steps(result)
    for phase, steps in zip(result.phases, ranges, strict=True):
        kept = [i for i in steps if i > 0] or list(steps)
        peaks = [result.peaks[i] for i in kept if i < len(result.peaks)]
        phase.peak_bytes = max(peaks) if peaks else None
    timed = [result.step_times[i] for i in ranges[0] if i > 0 and i < len(result.step_times)]
    if not timed:
        return
    first = result.phases[0]
    result.step_s = statistics.median(timed)
    result.tokens_per_s = first.tokens / result.step_s
    masked = [result.masked_rows[i] for i in ranges[0] if i < len(result.masked_rows)]
    scored = statistics.mean(masked) if masked_only and masked else float(first.tokens)
    result.step_flops = step_flops(model, first.tokens, first.length, scored, result.layers)
    result.mfu = result.step_flops / result.step_s / peak_flops if peak_flops else None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def quiet_transformers() -> Any:
    """Only errors from transformers while the runs report their progress."""
    import transformers

    level = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing renames
            yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()
