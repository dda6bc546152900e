"""What a training job measures on its held-out split, and when.

The held-out ELBO (elbo.py; none for DiffusionGemma, see `bounded`) at every evaluation,
before training and at the end; answer
accuracy (accuracy.py) before training, at the end, and at every evaluation when
`sample_every_eval` is on. The Trainer adds `measure`'s numbers to its own eval metrics
(DiffusionTrainer.evaluation_loop), so they reach the log, TensorBoard, the host's metrics and
run_summary.json like eval_loss does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..methods import Method
from ..models.families import TokenIds
from ..preview import PreviewPrompt, pick_prompts
from .accuracy import Accuracy, answer_accuracy, describe_sampler
from .elbo import ElboEstimate, Row, has_bound, heldout_elbo, rows_of

logger = logging.getLogger(__name__)


@dataclass
class HeldOutEvaluation:
    method: Method
    tokenizer: Any
    ids: TokenIds
    rows: list[Row]
    prompts: list[PreviewPrompt]  # the first eval_generate_samples held-out conversations
    mc_samples: int
    seed: int
    batch_size: int
    max_new_tokens: int
    accuracy_every_eval: bool
    # Block diffusion: the trained block size (its bound and its sampler need it); else None.
    block_size: int | None = None
    # Set for the last evaluation: accuracy is measured at the end of training in any case.
    final: bool = False
    seconds: dict[str, float] = field(default_factory=dict)  # time spent, for the summary
    latest: Accuracy | None = None  # the last accuracy measurement, with its answers
    _sampler_logged: bool = False
    _bound_skip_logged: bool = False

    @classmethod
    def for_job(cls, cfg: Any, prep: Any) -> HeldOutEvaluation | None:
        """None without a held-out split."""
        if prep.eval is None:
            return None
        n = min(cfg.eval_generate_samples, len(prep.eval))
        conversations = prep.eval.select(range(n))["messages"] if n else []
        return cls(
            method=prep.method,
            tokenizer=prep.tokenizer,
            ids=prep.ids,
            rows=rows_of(prep.eval),
            prompts=pick_prompts(conversations, n),
            mc_samples=cfg.eval_mc_samples,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.preview_max_new_tokens,
            accuracy_every_eval=cfg.sample_every_eval,
            block_size=prep.method.sampling_block_size(cfg.block_size),
        )

    # ---- the two measurements ------------------------------------------------------
    @property
    def bounded(self) -> bool:
        """Whether the method has an ELBO to estimate; without one (DiffusionGemma) the
        held-out score is eval_loss, the recipe's loss under the same keyed draws at every
        evaluation (said once per job)."""
        if not has_bound(self.method.trainer_class()):
            if not self._bound_skip_logged:
                logger.info(
                    "held-out NLL bound: skipped, %s has no masked-diffusion ELBO; its held-out "
                    "score is eval_loss (the training loss under the same noise at every "
                    "evaluation)",
                    self.method.title,
                )
                self._bound_skip_logged = True
            return False
        return True

    def elbo(self, model: Any, verdict: Any = None) -> ElboEstimate:
        started = time.perf_counter()
        estimate = heldout_elbo(
            model,
            self.method.bound_scorer(self.block_size),
            self.rows,
            self.ids,
            mc_samples=self.mc_samples,
            seed=self.seed,
            batch_size=self.batch_size,
            verdict=verdict,
        )
        self._add_time("elbo", started)
        return estimate

    def accuracy(self, model: Any) -> Accuracy | None:
        if not self.prompts:
            return None
        if not self._sampler_logged:
            described = describe_sampler(
                self.method, len(self.prompts), self.max_new_tokens, self.block_size
            )
            logger.info("%s", described)
            self._sampler_logged = True
        started = time.perf_counter()
        self.latest = answer_accuracy(
            model, self.tokenizer, self.ids, self.method, self.prompts, self.max_new_tokens,
            self.block_size,
        )  # fmt: skip
        self._add_time("accuracy", started)
        return self.latest

    # ---- inside a Trainer --------------------------------------------------------------
    def measure(self, trainer: Any, accuracy: bool | None = None) -> dict[str, float]:
        """The numbers of one evaluation (keys without the eval_ prefix); accuracy by
        default at the final evaluation and, with sample_every_eval, at every one.

        The ELBO runs on every process (a sharded model needs them all); generation runs
        on the main process only, and not with sharded weights (as the previews).
        """
        import torch

        values: dict[str, float] = {}
        if self.bounded:
            with torch.no_grad(), trainer.compute_loss_context_manager():
                values.update(self.elbo(trainer.model, trainer.head_verdict).metrics())
        if accuracy is None:
            accuracy = self.final or self.accuracy_every_eval
        if accuracy:
            model = _generation_model(trainer)
            result = self.accuracy(model) if model is not None else None
            if result is not None:
                values.update(result.metrics())
        return values

    def before_training(self, trainer: Any) -> dict[str, float] | None:
        """Measure the model as loaded, print it, and log it at step 0."""
        if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
            logger.info("held-out before training: skipped with fsdp/deepspeed (not sharded yet)")
            return None
        values = self.measure(trainer, accuracy=True)
        print_line("held-out before training", values)
        trainer.log({f"eval_{k}": v for k, v in values.items()})
        return values

    def final_evaluation(self, trainer: Any) -> dict[str, float]:
        """The Trainer's last evaluation, with answer accuracy whatever the setting."""
        self.final = True
        metrics = trainer.evaluate()
        print_line("held-out after training", metrics, prefix="eval_")
        return metrics

    def summary(self, before: dict[str, float] | None, metrics: dict[str, Any]) -> dict[str, Any]:
        """For run_summary.json: the numbers before and after training, the answers of the
        last accuracy measurement, the settings and the time spent."""
        after = {
            k.removeprefix("eval_"): metrics[k]
            for k in ("eval_nll_bound", "eval_nll_bound_se", "eval_exact_match", "eval_token_f1")
            if k in metrics
        }
        answers = self.latest.answers if self.latest is not None else ()
        return {
            "before_training": before,
            "after_training": after or None,
            "rows": len(self.rows),
            "mc_samples": self.mc_samples if self.bounded else None,
            "generate_samples": len(self.prompts),
            "answers": [
                {"prompt": p.messages[-1]["content"], "reference": p.reference, "generated": a}
                for p, a in zip(self.prompts, answers, strict=False)
            ],
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }

    def _add_time(self, what: str, started: float) -> None:
        self.seconds[what] = self.seconds.get(what, 0.0) + time.perf_counter() - started


def _generation_model(trainer: Any) -> Any:
    if not trainer.is_world_process_zero():
        return None
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        return None
    return trainer.accelerator.unwrap_model(trainer.model)


def print_line(title: str, values: dict[str, float], prefix: str = "") -> None:
    """One log line a user can read: the bound with its standard error, and accuracy."""
    parts = []
    if f"{prefix}nll_bound" in values:
        parts.append(
            f"NLL bound {values[f'{prefix}nll_bound']:.4f} ± {values[f'{prefix}nll_bound_se']:.4f}"
            " nats/answer token"
        )
    if f"{prefix}exact_match" in values:
        parts.append(
            f"exact match {values[f'{prefix}exact_match']:.3f}, "
            f"token F1 {values[f'{prefix}token_f1']:.3f}"
        )
    if parts:
        logger.info("%s: %s", title, "; ".join(parts))
