"""Write trained models where the host finds them, atomically.

A model folder is written to a hidden temporary sibling and renamed into place when
complete (atomic.py), so a crash leaves either the old folder or the new one.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .atomic import atomic_folder, write_json
from .errors import ConfigError

logger = logging.getLogger(__name__)


def safe_name(name: str, what: str = "name") -> str:
    """A single path component: no separators, no '..', no leading dots."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name).strip()).strip("._")
    if not cleaned:
        raise ValueError(f"{what} {name!r} has no usable characters for a folder name")
    return cleaned[:128]


def model_short_name(model_name: str) -> str:
    """'org/Model-7B' or '/path/to/Model-7B' -> 'Model-7B' (safe)."""
    return safe_name(Path(str(model_name).rstrip("/")).name or str(model_name), "model_name")


def make_output_dir(path: Path) -> None:
    """Create output_dir, or fail naming the field (the Trainer would fail later, obscurely)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output_dir: cannot create {str(path)!r}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: {str(path)!r} is not writable")


def save_model_folder(dest: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` and move the result to `dest` atomically."""
    with atomic_folder(dest) as tmp:
        write(tmp)
    logger.info("saved %s", dest)
    return dest


def host_model_record(name: str, architecture: str, description: str) -> dict[str, Any]:
    """The index.json the host reads to list a model in its Foundation tab."""
    model_id = f"TransformerLab/{name}"
    return {
        "model_id": model_id,
        "model_filename": ".",
        "name": name,
        "local_model": True,
        "json_data": {
            "uniqueID": model_id,
            "name": name,
            "model_filename": ".",
            "description": description,
            "source": "transformerlab",
            "architecture": architecture,
            "huggingface_repo": "",
        },
    }


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
        raise ValueError(f"adaptor_output_dir {given!r} must not contain '..'")
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


def planned_output(cfg: Any, models_dir: Path | None) -> Path:
    """Where this job's model will go, computed before training so that a bad name fails
    the job at once instead of after the last step."""
    try:
        return adaptor_dir(cfg) if cfg.lora else full_model_dir(cfg, models_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _architecture(model: Any) -> str:
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    return archs[0]


def _save_full(model: Any, tokenizer: Any, dest: Path, record: dict[str, Any] | None) -> None:
    def write(tmp: Path) -> None:
        # The checkpoint's remote-code map points at files we do not copy: drop it so
        # loaders use the registered native classes.
        if hasattr(model.config, "auto_map"):
            del model.config.auto_map
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if record is not None:
            write_json(tmp / "index.json", record)

    save_model_folder(dest, write)


def save_outputs(cfg: Any, prep: Any, trainer: Any, host: Any) -> dict[str, Any]:
    """Save the adaptor (and the merged model when asked) or the full model."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    models_dir = host.models_dir()
    if hasattr(model, "peft_config"):
        dest = adaptor_dir(cfg)
        save_model_folder(
            dest, lambda tmp: (model.save_pretrained(tmp), prep.tokenizer.save_pretrained(tmp))
        )
        result: dict[str, Any] = {"output_path": str(dest), "output_kind": "lora_adaptor"}
        if cfg.merge_adaptor:
            result["merged_model_path"] = str(save_merged(cfg, prep, dest, host, models_dir))
        return result
    dest = full_model_dir(cfg, models_dir)
    architecture = _architecture(model)
    record = _host_record(dest.name, architecture, cfg) if models_dir is not None else None
    _save_full(model, prep.tokenizer, dest, record)
    if record is not None:
        host.register_model(dest, dest.name, architecture)
    return {"output_path": str(dest), "output_kind": "full_model"}


def _host_record(name: str, architecture: str, cfg: Any) -> dict[str, Any]:
    return host_model_record(
        name,
        architecture,
        f"{cfg.training_method} diffusion SFT of {cfg.model_name} on {cfg.dataset_name}",
    )


def save_merged(cfg: Any, prep: Any, adaptor: Path, host: Any, models_dir: Path | None) -> Path:
    """Base (reloaded unquantised, fp32) + adaptor, merged and saved as a full model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForMaskedLM

    base = AutoModelForMaskedLM.from_pretrained(prep.model_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adaptor)).merge_and_unload()
    dest = full_model_dir(cfg, models_dir, suffix="_merged")
    architecture = _architecture(merged)
    record = _host_record(dest.name, architecture, cfg) if models_dir is not None else None
    _save_full(merged, prep.tokenizer, dest, record)
    if record is not None:
        host.register_model(dest, dest.name, architecture)
    return dest
