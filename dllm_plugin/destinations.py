"""Where a job's models go, and whether it may write there.

Saving replaces a destination folder whole (atomic.py), so before training starts every
destination is checked: it may be replaced only when it is empty or holds what this
trainer wrote there earlier (our marker file; for folders written before the marker
existed, also by the original plugin: an adaptor or model folder that is not the base
model's own folder). The base model's folder, the dataset, output_dir and any folder
containing one of them are never replaced. Anything else fails the job at once with
one line, so a mistyped path can never delete a user's files.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

logger = logging.getLogger(__name__)

MARKER = ".dllm-trainer.json"  # written into every model and adaptor folder we save
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class Destination:
    """One folder the job will write, and the parameter that chose it (for messages)."""

    path: Path
    field: str
    kind: str  # "adaptor", "model" or "merged model"


def safe_name(name: str, what: str = "name") -> str:
    """A single path component: no separators, no '..', no leading dots."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name).strip()).strip("._")
    if not cleaned:
        raise ConfigError(f"{what}: {name!r} has no usable characters for a folder name")
    return cleaned[:128]


def model_short_name(model_name: str) -> str:
    """'org/Model-7B' or '/path/to/Model-7B' -> 'Model-7B' (safe)."""
    return safe_name(Path(str(model_name).rstrip("/")).name or str(model_name), "model_name")


def adaptor_dir(cfg: Any) -> Path:
    """The host's adaptor_output_dir, else <output_dir>/adaptors/<adaptor_name>.

    The host builds adaptor_output_dir by appending the adaptor name as the user typed
    it: a name such as '../../evil' is replaced by its sanitised form, so the adaptor
    stays one folder below the host's adaptors/<model>/ folder.
    """
    name = safe_name(cfg.adaptor_name, "adaptor_name")
    if not cfg.adaptor_output_dir:
        return Path(cfg.output_dir) / "adaptors" / name
    given, raw = str(cfg.adaptor_output_dir), str(cfg.adaptor_name)
    if _unsafe_component(raw) and given.rstrip("/\\").endswith(raw.rstrip("/\\")):
        return Path(given.rstrip("/\\")[: -len(raw.rstrip("/\\"))]) / name
    if ".." in Path(given).parts:
        raise ConfigError(f"adaptor_output_dir: {given!r} must not contain '..'")
    return Path(given)


def _unsafe_component(name: str) -> bool:
    """Not usable as one folder name as it is (separators, '..', hidden, empty)."""
    return not name or name.startswith(".") or "/" in name or "\\" in name


def full_model_dir(cfg: Any, models_dir: Path | None, suffix: str = "") -> Path:
    """<models dir>/<base short name>_<adaptor_name>[_suffix]; stand-alone under output_dir/models."""
    name = (
        f"{model_short_name(cfg.model_name)}_{safe_name(cfg.adaptor_name, 'adaptor_name')}{suffix}"
    )
    return (models_dir or Path(cfg.output_dir) / "models") / name


def planned_destinations(cfg: Any, models_dir: Path | None) -> list[Destination]:
    """Every folder this job will write a model into, main output first."""
    if not cfg.lora:
        return [Destination(full_model_dir(cfg, models_dir), "adaptor_name", "model")]
    field = "adaptor_output_dir" if cfg.adaptor_output_dir else "adaptor_name"
    planned = [Destination(adaptor_dir(cfg), field, "adaptor")]
    if cfg.merge_adaptor:
        planned.append(
            Destination(full_model_dir(cfg, models_dir, "_merged"), "adaptor_name", "merged model")
        )
    return planned


def check_destinations(
    planned: list[Destination], protected: dict[str, Path | None], base_model: Path | None
) -> None:
    """Refuse, before anything is written, destinations whose replacement could lose data.

    `protected` maps a name (for the message) to a path that must survive: the base
    model, the dataset, output_dir.
    """
    problems = []
    for dest in planned:
        why = refusal(dest.path, protected, base_model)
        if why:
            problems.append(f"{dest.field}: the {dest.kind} folder {str(dest.path)!r} {why}")
    if problems:
        raise ConfigError(problems)


def refusal(dest: Path, protected: dict[str, Path | None], base_model: Path | None) -> str | None:
    """Why `dest` must not be replaced, or None."""
    target = _absolute(dest)
    for name, path in protected.items():
        if path is not None and (target == _absolute(path) or target in _absolute(path).parents):
            return f"is or contains the {name} ({str(path)!r}): it would be deleted"
    if not target.exists():
        return None
    if not target.is_dir():
        return "exists and is not a folder"
    if not any(target.iterdir()):
        return None
    if (target / MARKER).is_file():
        return None
    if looks_like_model_folder(target) and (base_model is None or target != _absolute(base_model)):
        logger.info("%s holds a model or adaptor saved before markers existed: replacing it", dest)
        return None
    shown = ", ".join(sorted(p.name for p in target.iterdir())[:5])
    return (
        f"holds files this trainer did not write ({shown}...); choose a new or empty folder, "
        "or remove them"
    )


def looks_like_model_folder(folder: Path) -> bool:
    """An adaptor (adapter_config.json) or a model (config.json and weight files)."""
    if (folder / "adapter_config.json").is_file():
        return True
    return (folder / "config.json").is_file() and any(
        p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir()
    )


def _absolute(path: Path) -> Path:
    return Path(path).expanduser().resolve()


def marker(kind: str, cfg: Any) -> dict[str, Any]:
    """The marker file's content: who wrote the folder, and for which job."""
    return {
        "written_by": "dllm-trainer",
        "kind": kind,
        "job_id": cfg.job_id,
        "model_name": cfg.model_name,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_marker(folder: Path, kind: str, cfg: Any) -> None:
    (Path(folder) / MARKER).write_text(json.dumps(marker(kind, cfg), indent=2), encoding="utf-8")
