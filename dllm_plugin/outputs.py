"""Write trained models where the host finds them, atomically.

A model folder is written to a hidden temporary sibling and renamed into place when
complete (atomic.py), so a crash leaves either the old folder or the new one. Where the
folders are, and whether they may be replaced, is destinations.py (checked before
training, and again here).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .atomic import atomic_folder, write_json
from .destinations import adaptor_dir, full_model_dir, refusal, write_marker
from .errors import ConfigError
from .methods import RECIPE_FILE, recipe

logger = logging.getLogger(__name__)


def save_model_folder(
    dest: Path, write: Callable[[Path], None], kind: str, cfg: Any, base_model: Path | None = None
) -> Path:
    """Run `write(tmp)`, add our marker, and move the result to `dest` atomically.

    The destination was checked before training; it is checked again here, since a
    folder can appear while a job trains.
    """
    why = refusal(dest, {}, base_model)
    if why:
        raise ConfigError(f"the {kind} folder {str(dest)!r} {why}")
    with atomic_folder(dest) as tmp:
        write(tmp)
        write_marker(tmp, kind, cfg)
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


def _architecture(model: Any) -> str:
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    return archs[0]


def _write_recipe(folder: Path, prep: Any, cfg: Any) -> None:
    """How the model was trained, for generate and evaluation (methods.RECIPE_FILE)."""
    write_json(folder / RECIPE_FILE, recipe(prep.method, cfg.block_size))


def _save_full(
    model: Any,
    prep: Any,
    dest: Path,
    record: dict[str, Any] | None,
    kind: str,
    cfg: Any,
) -> None:
    def write(tmp: Path) -> None:
        # The checkpoint's remote-code map points at files we do not copy: drop it so
        # loaders use the registered native classes.
        if hasattr(model.config, "auto_map"):
            del model.config.auto_map
        model.save_pretrained(tmp)
        prep.tokenizer.save_pretrained(tmp)
        _write_recipe(tmp, prep, cfg)
        if record is not None:
            write_json(tmp / "index.json", record)

    save_model_folder(dest, write, kind, cfg, Path(prep.model_path))


def save_outputs(cfg: Any, prep: Any, trainer: Any, host: Any) -> dict[str, Any]:
    """Save the adaptor (and the merged model when asked) or the full model."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    models_dir = host.models_dir()
    if hasattr(model, "peft_config"):
        dest = adaptor_dir(cfg)
        save_model_folder(
            dest,
            lambda tmp: (
                model.save_pretrained(tmp),
                prep.tokenizer.save_pretrained(tmp),
                _write_recipe(tmp, prep, cfg),
            ),
            "adaptor",
            cfg,
            Path(prep.model_path),
        )
        host.output_saved(dest, "adaptor", _architecture(model), cfg.model_name)
        result: dict[str, Any] = {"output_path": str(dest), "output_kind": "lora_adaptor"}
        if cfg.merge_adaptor:
            result["merged_model_path"] = str(save_merged(cfg, prep, dest, host, models_dir))
        return result
    dest = full_model_dir(cfg, models_dir)
    architecture = _architecture(model)
    record = _host_record(dest.name, architecture, cfg) if models_dir is not None else None
    _save_full(model, prep, dest, record, "model", cfg)
    if record is not None:
        host.register_model(dest, dest.name, architecture)
    host.output_saved(dest, "model", architecture, cfg.model_name)
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

    from .models.loading import from_pretrained

    base = from_pretrained(prep.model_path, prep.family, prep.ids, dtype=torch.float32)
    # Merged as loaded: an adaptor the family shares between module trees (DiffusionGemma)
    # wraps only one of them, so its delta enters the shared weight exactly once.
    merged = PeftModel.from_pretrained(base, str(adaptor)).merge_and_unload()
    dest = full_model_dir(cfg, models_dir, suffix="_merged")
    architecture = _architecture(merged)
    record = _host_record(dest.name, architecture, cfg) if models_dir is not None else None
    _save_full(merged, prep, dest, record, "merged model", cfg)
    if record is not None:
        host.register_model(dest, dest.name, architecture)
    host.output_saved(dest, "merged model", architecture, cfg.model_name)
    return dest
