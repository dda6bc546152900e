"""A PNG of the train/eval loss curves, from the Trainer's log history.

Stand-alone users get a picture of the run without starting TensorBoard. matplotlib's
Agg backend draws without a display (servers, the host's job processes).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .atomic import write_file

logger = logging.getLogger(__name__)

PLOT_NAME = "loss_curves.png"


def loss_points(log_history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged metric, in logging order."""
    points = [
        (int(entry["step"]), float(entry[key]))
        for entry in log_history
        if isinstance(entry.get(key), int | float) and "step" in entry
    ]
    return [s for s, _ in points], [v for _, v in points]


def plot_loss_curves(log_history: list[dict[str, Any]], output_dir: Path) -> Path | None:
    """Write <output_dir>/loss_curves.png; None when nothing was logged or drawing failed.

    A plot is a convenience: a failure here is logged, never raised.
    """
    train = loss_points(log_history, "loss")
    evals = loss_points(log_history, "eval_loss")
    if not train[0] and not evals[0]:
        return None
    try:
        return _draw(train, evals, Path(output_dir) / PLOT_NAME)
    except Exception as e:  # matplotlib missing or broken: the run itself is fine
        logger.warning("could not draw the loss curves: %s", e)
        return None


def _draw(
    train: tuple[list[int], list[float]], evals: tuple[list[int], list[float]], path: Path
) -> Path:
    # The Agg canvas directly, without pyplot: no display and no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if train[0]:
        ax.plot(*train, label="train loss", linewidth=1.2)
    if evals[0]:
        ax.plot(*evals, label="eval loss", marker="o", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    logger.info("loss curves: %s", path)
    return path
