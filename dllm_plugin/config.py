"""Job configuration: read the host's input file, coerce, validate against the manifest.

The manifest (`index.json`) is the single source of truth for parameter names, types,
defaults and ranges: this module reads it and never lists parameters by hand. Host
fields (model, dataset, folders, templates) are not form parameters; they have their
own small schema here because the host, not the user, fills them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .methods import AUTO, check_method_options, method_row

if TYPE_CHECKING:
    import jsonschema

logger = logging.getLogger(__name__)

PLUGIN_DIR = Path(__file__).resolve().parents[1]
MANIFEST_PATH = PLUGIN_DIR / "index.json"

# Fields the host adds beside the form's parameters (docs/architecture.md, "Hosts").
HOST_FIELDS: dict[str, dict[str, Any]] = {
    "model_name": {"type": "string", "minLength": 1},
    "model_architecture": {"type": "string"},
    "dataset_name": {"type": "string"},
    "dataset_split": {"type": "string"},
    "dataset_config_name": {"type": "string"},  # a hub dataset's configuration
    "template_name": {"type": "string"},
    "job_id": {"type": ["string", "integer"]},
    "output_dir": {"type": "string", "minLength": 1},
    "adaptor_output_dir": {"type": "string"},
    "input_template": {"type": "string"},
    "output_template": {"type": "string"},
    "instruction_template": {"type": "string"},
    "experiment_name": {"type": "string"},
}
STANDALONE_OUTPUT_DIR = "./output"
_TRUE = {"true", "1", "yes", "on", "y", "t"}
_FALSE = {"false", "0", "no", "off", "n", "f"}


@cache
def load_manifest(path: Path = MANIFEST_PATH) -> dict[str, Any]:
    """The plugin manifest, read once per process."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def parameter_schemas() -> dict[str, dict[str, Any]]:
    return load_manifest()["parameters"]


def defaults() -> dict[str, Any]:
    return {name: spec["default"] for name, spec in parameter_schemas().items()}


@dataclass
class JobConfig:
    """Validated parameters plus host fields; attribute access for both.

    `params` holds every manifest parameter (defaults filled in); `host` the host fields
    that were given; `experiment` the host's experiment record, if any; `source_dir` the
    folder of the input file, against which stand-alone relative paths are resolved.
    """

    params: dict[str, Any]
    host: dict[str, Any] = field(default_factory=dict)
    experiment: dict[str, Any] | None = None
    source_dir: Path | None = None
    given: frozenset[str] = frozenset()  # the parameter names the job set itself

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: expose params and host fields.
        for mapping in (self.__dict__.get("params", {}), self.__dict__.get("host", {})):
            if name in mapping:
                return mapping[name]
        if name in HOST_FIELDS:
            return None
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        return {**self.host, **self.params}


def read_input_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(config, experiment) from a job file `{"config": {...}, "experiment": {...}}`.

    The host writes this shape; a stand-alone job file uses it too. Anything else is
    refused with the reason, rather than guessed at (a flat file of parameters used to be
    read as a config, so a job file without `config` ran on defaults).
    """
    path = Path(path)
    name = repr(str(path))
    if not path.is_file():
        raise ConfigError(f"input file {name} does not exist or is not a file")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"input file {name} is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x})"
        ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"input file {name} is not valid JSON: {e}") from None
    except RecursionError:
        raise ConfigError(f"input file {name} is nested too deeply to be a job file") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f'input file {name} must hold a JSON object {{"config": {{...}}}}, '
            f"got {type(data).__name__}"
        )
    if "config" not in data:
        known = sorted(k for k in data if k in parameter_schemas() or k in HOST_FIELDS)
        hint = (
            f" (it looks like a bare config: put {', '.join(known[:3])}... inside it)"
            if known
            else ""
        )
        raise ConfigError(
            f'input file {name} has no "config" object: expected {{"config": {{...}}}}{hint}'
        )
    config = data["config"]
    if isinstance(config, str):  # some host versions store the config as a JSON string
        try:
            config = json.loads(config)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ConfigError(
                f"'config' in input file {name} is a string but not JSON: {e}"
            ) from None
    if not isinstance(config, dict):
        raise ConfigError(
            f"'config' in input file {name} must be an object, got {type(config).__name__}"
        )
    experiment = data.get("experiment")
    return config, experiment if isinstance(experiment, dict) else None


def coerce(value: Any, schema: Mapping[str, Any]) -> Any:
    """Turn host strings ("true", "0.25", "8") into the schema's type; leave the rest as is.

    Values that cannot be coerced are returned unchanged so that validation reports them
    with the field name and the allowed values.
    """
    kind = schema.get("type")
    if kind == "boolean" and isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    elif kind == "boolean" and isinstance(value, int) and value in (0, 1):
        return bool(value)
    elif kind == "integer":
        number = _to_number(value)
        if isinstance(number, float) and number.is_integer():
            return int(number)
        return number
    elif kind == "number":
        number = _to_number(value)
        return number
    elif kind == "string" and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


def _to_number(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return value
    return value


def _describe(error: jsonschema.ValidationError) -> str:
    """One line naming the field, the value and what is allowed."""
    name = ".".join(str(p) for p in error.path) or "<config>"
    value = error.instance
    v, kind = error.validator_value, error.validator
    allowed = {
        "enum": lambda: f"must be one of {', '.join(map(repr, v))}",
        "type": lambda: f"must be of type {v if isinstance(v, str) else ' or '.join(v)}",
        "minimum": lambda: f"must be >= {v}",
        "maximum": lambda: f"must be <= {v}",
        "exclusiveMinimum": lambda: f"must be > {v}",
        "exclusiveMaximum": lambda: f"must be < {v}",
        "multipleOf": lambda: f"must be a multiple of {v}",
        "minLength": lambda: "must not be empty",
        "pattern": lambda: (
            "must have the form " + " or ".join(repr(x) for x in error.schema.get("examples", [v]))
        ),
    }.get(kind, lambda: error.message)()
    return f"{name}: {value!r} is not allowed: {allowed}"


def build_job_config(
    raw: Mapping[str, Any],
    experiment: dict[str, Any] | None = None,
    source_dir: Path | None = None,
) -> JobConfig:
    """Coerce and validate a raw config; raise ConfigError listing every problem."""
    schemas = parameter_schemas()
    params: dict[str, Any] = defaults()
    host: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in raw.items():
        if key in schemas:
            if value is None or (value == "" and schemas[key].get("type") != "string"):
                logger.warning("%s is empty: using the default %r", key, schemas[key]["default"])
                continue
            params[key] = coerce(value, schemas[key])
        elif key in HOST_FIELDS:
            if value is not None and value != "":
                host[key] = coerce(value, HOST_FIELDS[key])
        else:
            unknown.append(key)
    if unknown:
        logger.warning(
            "ignoring config keys this plugin does not use: %s", ", ".join(sorted(unknown))
        )

    import jsonschema  # here, not at import: the machine check reads the manifest without it

    schema = {"type": "object", "properties": {**schemas, **HOST_FIELDS}}
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors({**host, **params}), key=str)
    problems = [_describe(e) for e in errors]
    invalid = {str(e.path[0]) for e in errors if e.path}
    valid = {k: v for k, v in params.items() if k not in invalid}  # each problem once
    problems += cross_field_problems(valid, host)
    if problems:
        raise ConfigError(problems)
    host.setdefault("output_dir", STANDALONE_OUTPUT_DIR)
    cfg = JobConfig(params, host, experiment, source_dir, frozenset(k for k in raw if k in schemas))
    if cfg.training_method != AUTO:  # with auto the model decides (checked before loading it)
        check_method_options(method_row(cfg.training_method, cfg.diffusion_type), cfg)
    return cfg


def cross_field_problems(params: Mapping[str, Any], host: Mapping[str, Any]) -> list[str]:
    """Combinations the schema alone cannot express."""
    problems: list[str] = []
    if params.get("load_in_4bit") is True and params.get("lora") is False:
        problems.append(
            "load_in_4bit: true needs lora: true (full fine-tuning of a 4-bit model is not possible)"
        )
    if params.get("merge_adaptor") is True and params.get("lora") is False:
        problems.append("merge_adaptor: true needs lora: true (there is no adaptor to merge)")
    if params.get("dtype") == "float16" and params.get("train_device") == "cpu":
        problems.append(
            "dtype: 'float16' needs train_device 'cuda' (CPU has no fp16 mixed precision); use 'bfloat16' or 'float32'"
        )
    try:
        parse_gpu_ids(params.get("gpu_ids", "auto"))
    except ConfigError as e:
        problems += e.problems
    if isinstance(params.get("num_machines"), int) and params["num_machines"] > 1:
        if not str(params.get("main_process_ip", "")).strip():
            problems.append("main_process_ip: must be set when num_machines > 1")
        if (
            isinstance(params.get("machine_rank"), int)
            and params["machine_rank"] >= params["num_machines"]
        ):
            problems.append(
                f"machine_rank: {params['machine_rank']!r} is not allowed: must be < num_machines ({params['num_machines']})"
            )
    if isinstance(params.get("loss_weight_type"), str):
        from .diffusion.loss import parse_loss_weight_type

        try:
            parse_loss_weight_type(params["loss_weight_type"])
        except ValueError as e:
            problems.append(str(e))
    resume = str(params.get("resume_from_checkpoint", "off")).strip()
    if resume not in ("off", "auto", "") and not Path(resume).expanduser().is_dir():
        problems.append(
            f"resume_from_checkpoint: {resume!r} is not allowed: must be 'off', 'auto' or an existing checkpoint folder"
        )
    if (
        params.get("eval_strategy") != "no"
        and params.get("sample_every_eval") is True
        and params.get("num_preview_samples") == 0
        and params.get("eval_generate_samples") == 0
    ):
        problems.append(
            "sample_every_eval: true needs num_preview_samples > 0 or eval_generate_samples > 0"
        )
    return problems


def resolve_path(value: str, source_dir: Path | None) -> Path:
    """A user path; relative ones are tried against the input file's folder, then the cwd."""
    path = Path(value).expanduser()
    if not path.is_absolute() and source_dir is not None and (source_dir / path).exists():
        return source_dir / path
    return path


def looks_like_path(name: str) -> bool:
    """A name meant as a folder: absolute, relative with ./ or ../, ~, or more than one '/'
    (a hub id is 'org/name')."""
    text = str(name)
    return (
        text.startswith(("/", "./", "../", "~", ".\\"))
        or text.count("/") > 1
        or "\\" in text
        or text in (".", "..")
    )


def parse_gpu_ids(value: Any) -> tuple[str, ...] | None:
    """'auto' -> None (all visible GPUs); '0, 2' -> ('0', '2'). Anything else is an error."""
    text = str(value).strip()
    if text in ("", "auto"):
        return None
    ids = tuple(part.strip() for part in text.split(","))
    if not all(part.isdigit() for part in ids):
        raise ConfigError(
            f"gpu_ids: {text!r} is not allowed: must be 'auto' or a comma-separated list of "
            "GPU indices such as '0,2'"
        )
    if len(set(ids)) != len(ids):
        raise ConfigError(f"gpu_ids: {text!r} lists a GPU twice")
    return ids


def gradient_clip_norm(cfg: JobConfig) -> float:
    """The clipping threshold: `max_grad_norm` 0 means no clipping (a bound never reached)."""
    return float(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else 1e9
