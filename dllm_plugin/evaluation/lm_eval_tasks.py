"""`eval_tasks`: lm-evaluation-harness tasks run on the trained model after training.

Checked before any weight is loaded (lm-eval installed, local files there, task names
known); run in this process on the model just trained, after it is saved, so a task that
fails (a dataset download on an offline machine) fails the job with one line and loses
nothing. The tasks see the model through our `dllm` model type (lm_eval_model.py) with the
chat template it was trained with; the draws per example are `eval_mc_samples`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import looks_like_path, resolve_path
from ..errors import ConfigError, UserError, first_line
from ..jobdir import write_summary

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'dllm-trainer[eval]' (or: pip install 'lm-eval>=0.4.13,<0.5')"
_YAML = (".yaml", ".yml")


@dataclass(frozen=True)
class TaskPlan:
    """What lm-eval loads: task names or YAML paths, and the folders to index."""

    tasks: tuple[str, ...]
    include_paths: tuple[str, ...]
    needs_builtin: bool  # some task is a name from lm-eval's own task folder


def plan(cfg: Any) -> TaskPlan | None:
    """The tasks of `eval_tasks` (None when empty), or a ConfigError naming the problem."""
    entries = [e.strip() for e in str(cfg.eval_tasks or "").split(",") if e.strip()]
    if not entries:
        return None
    require_lm_eval()
    tasks: list[str] = []
    folders: list[str] = []
    names: list[str] = []
    for entry in entries:
        path = resolve_path(entry, cfg.source_dir)
        if path.is_dir():
            found = task_manager((str(path),), builtin=False).all_subtasks
            if not found:
                raise ConfigError(f"eval_tasks: the folder {entry!r} defines no lm-eval task")
            folders.append(str(path))
            tasks += found
        elif path.suffix.lower() in _YAML or looks_like_path(entry):
            if not path.is_file():
                raise ConfigError(f"eval_tasks: {entry!r} does not exist")
            tasks.append(str(path.resolve()))
        else:
            names.append(entry)
            tasks.append(entry)
    if names:
        known = task_manager(tuple(folders), builtin=True).all_tasks
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(
                f"eval_tasks: unknown lm-eval task {', '.join(map(repr, unknown))} "
                "(see `lm-eval ls tasks`, or give a task YAML file or folder)"
            )
    return TaskPlan(tuple(tasks), tuple(folders), bool(names))


@functools.cache
def task_manager(include_paths: tuple[str, ...], builtin: bool) -> Any:
    """lm-eval's task index of these folders (and of its own ~14k task files when `builtin`:
    about 7 s on 2 cores), built once per process: the check before training and the run
    after it share it."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None, include_defaults=builtin)


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"eval_tasks: lm-evaluation-harness is not installed; {INSTALL_HINT}"
        ) from None


def run_after_training(
    task_plan: TaskPlan, cfg: Any, prep: Any, trainer: Any, host: Any, summary: dict[str, Any]
) -> None:
    """Evaluate the trained model; results into the summary, the metrics, TensorBoard and
    the host. Main process only (the caller's guard)."""
    output_dir = Path(cfg.output_dir)
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        logger.warning(
            "eval_tasks: skipped, the trained weights are sharded; run the lm-eval command of "
            "the README on the saved model"
        )
        summary["lm_eval"] = {"status": "skipped", "reason": "sharded weights"}
        write_summary(output_dir, summary)
        return
    summary["lm_eval"] = {"status": "running", "tasks": list(task_plan.tasks)}
    write_summary(output_dir, summary)
    try:
        results = evaluate(task_plan, lm_for(cfg, prep, trainer), trainer)
    except UserError as e:
        reason = f"{e}; the trained model is saved in {summary.get('output_path')}"
        summary["lm_eval"] = {"status": "failed", "reason": reason}
        write_summary(output_dir, summary)
        raise UserError(reason) from None
    values = flat_metrics(results)
    summary["lm_eval"] = {"status": "complete", "results": results}
    summary["metrics"].update(values)
    summary["score"].update(values)
    trainer.log(dict(values))  # TensorBoard and the host's metrics, at the last step
    host.add_data("lm_eval", results)
    write_summary(output_dir, summary)
    for key, value in values.items():
        logger.info("%s = %.4f", key, value)


def lm_for(cfg: Any, prep: Any, trainer: Any) -> Any:
    from .lm_eval_model import DiffusionLM, Loaded

    model = trainer.accelerator.unwrap_model(trainer.model)
    block_size = prep.method.sampling_block_size(cfg.block_size)
    loaded = Loaded(model, prep.tokenizer, prep.ids, prep.method, cfg.model_name, block_size)
    return DiffusionLM(
        loaded=loaded, mc_samples=cfg.eval_mc_samples, mc_batch=cfg.batch_size, seed=cfg.seed
    )


def evaluate(task_plan: TaskPlan, lm: Any, trainer: Any) -> dict[str, dict[str, Any]]:
    """lm-eval's results per task ({task: {"metric,filter": value}}).

    Tasks are loaded one at a time, so a failure names its task; the chat template is
    applied because the model was trained with it.
    """
    import lm_eval

    manager = task_manager(task_plan.include_paths, task_plan.needs_builtin)
    loaded = [obj for name in task_plan.tasks for obj in load_task(manager, name)]
    with trainer.compute_loss_context_manager():
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=loaded,
            task_manager=manager,
            apply_chat_template=True,
            log_samples=False,
            bootstrap_iters=0,
            random_seed=trainer.args.seed,
            numpy_random_seed=trainer.args.seed,
            torch_random_seed=trainer.args.seed,
            fewshot_random_seed=trainer.args.seed,
        )
    return {task: dict(values) for task, values in output["results"].items()}


def load_task(manager: Any, name: str) -> list[Any]:
    """The task (or group) objects of one entry (its dataset is read or downloaded here); failures name the task."""
    try:
        loaded = manager.load([name])
    except ConnectionError as e:
        raise UserError(
            f"eval_tasks: lm-eval task {name!r} needs a download and this machine cannot reach "
            f"the Hugging Face hub ({first_line(e)}); use a local task (dataset_path: json with "
            "data_files) or a machine with network access"
        ) from None
    except (FileNotFoundError, OSError, ValueError, KeyError) as e:
        raise UserError(
            f"eval_tasks: lm-eval task {name!r} could not be loaded "
            f"({type(e).__name__}: {first_line(e)})"
        ) from None
    if name in loaded["groups"]:
        return [loaded["groups"][name]]
    return list(loaded["tasks"].values())


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{"lm_eval/<task>/<metric>": value}; the filter name is kept when it is not 'none',
    standard errors are left out."""
    values: dict[str, float] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or "_stderr" in metric or not isinstance(value, int | float):
                continue  # "alias", "sample_len": not metrics
            name = metric if filter_name in ("", "none") else f"{metric}_{filter_name}"
            values[f"lm_eval/{task}/{name}"] = float(value)
    return values
