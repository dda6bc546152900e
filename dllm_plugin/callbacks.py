"""Trainer callbacks: progress, metrics and checkpoints to the host, stop requests on every rank."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from . import signals
from .hosts import Host

logger = logging.getLogger(__name__)


class StopSignals:
    """A stop flag set by SIGTERM/SIGINT or by the host; checked at each optimizer step."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""

    def request(self, reason: str) -> None:
        first = not self.requested
        self.requested, self.reason = True, reason  # before logging: a second signal may come
        if first:
            logger.warning("stop requested (%s): stopping at the end of this step", reason)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Turn SIGTERM/SIGINT into a graceful stop while training; restore after."""
        with signals.handling(lambda signum, _frame: self.request(signals.name(signum))):
            yield


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any (a stop seen by rank 0 stops them all)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    backend = torch.distributed.get_backend()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)


class HostCallback(TrainerCallback):
    """Reports monotonic progress with an ETA, metrics and each saved checkpoint; turns
    stop requests into a stop on every rank: with a checkpoint, or (for a host that
    allows only seconds between its stop signal and the exit) without one, keeping the
    newest periodic checkpoint as the resumable state."""

    def __init__(self, host: Host, stop: StopSignals):
        self.host = host
        self.stop = stop
        self.started = time.time()
        self.last_percent = 0.0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self.started = time.time()
        self.first_step = state.global_step

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if state.is_world_process_zero:
            self._report_progress(state)
            if self.host.should_stop():
                self.stop.request("the host asked to stop")
        if any_rank(self.stop.requested):
            if not control.should_training_stop and state.is_world_process_zero:
                logger.info(
                    "stopping at step %d %s",
                    state.global_step,
                    "with a checkpoint"
                    if self.host.stop_grace_s is None
                    else "without a new checkpoint (the newest one is the resumable state)",
                )
            self.stop.requested = True
            control.should_training_stop = True
            control.should_save = self.host.stop_grace_s is None

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        """Rank 0 reports the checkpoint once every rank has written its part (its RNG
        state): the Trainer has no barrier of its own after saving."""
        any_rank(False)  # every rank runs this callback: an all-reduce is a barrier
        if state.is_world_process_zero:
            self.host.checkpoint_saved(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def _report_progress(self, state: TrainerState) -> None:
        if not state.max_steps:
            return
        percent = max(self.last_percent, min(100.0, 100.0 * state.global_step / state.max_steps))
        done = state.global_step - self.first_step
        elapsed = time.time() - self.started
        eta = elapsed / done * (state.max_steps - state.global_step) if done > 0 else None
        self.last_percent = percent
        self.host.progress(percent, eta)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict | None = None,
        **kw: Any,
    ) -> None:
        if state.is_world_process_zero and logs:
            numbers = {k: float(v) for k, v in logs.items() if isinstance(v, int | float)}
            self.host.metrics(numbers, state.global_step)


class LossProgressBar(ProgressCallback):
    """The Trainer's tqdm bar (steps, rate, ETA) with the latest loss beside it.

    It also starts at the resumed step, so the ETA of a resumed run is not skewed by the
    steps it skipped.
    """

    def __init__(self) -> None:
        super().__init__()
        self.postfix: dict[str, str] = {}

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if state.is_world_process_zero:
            self.training_bar = tqdm(
                total=state.max_steps, initial=state.global_step, dynamic_ncols=True, desc="train"
            )
        self.current_step = state.global_step

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict | None = None,
        **kw: Any,
    ) -> None:
        if self.training_bar is not None and logs:
            for key in ("loss", "eval_loss"):
                if isinstance(logs.get(key), int | float):
                    self.postfix[key] = f"{logs[key]:.4g}"
            self.training_bar.set_postfix(self.postfix, refresh=True)
        super().on_log(args, state, control, logs=logs, **kw)


def use_loss_progress_bar(trainer: Any) -> None:
    """Swap the Trainer's progress bar for ours (only where the Trainer shows one)."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(LossProgressBar())
