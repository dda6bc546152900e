"""Config: host file and flat file, coercion by the manifest's types, every kind of error."""

from __future__ import annotations

import json

import pytest

from dllm_plugin.config import (
    build_job_config,
    coerce,
    defaults,
    load_manifest,
    read_input_file,
)
from dllm_plugin.errors import ConfigError

ORIGINAL_PARAMETERS = {
    "train_device": ("cuda", ["cuda", "cpu", "tpu"]),
    "gpu_ids": ("auto", None),
    "training_method": ("bert", ["bert", "dream", "llada"]),
    "batch_size": (4, None),
    "learning_rate_schedule": ("cosine", ["constant", "linear", "cosine", "constant_with_warmup"]),
    "learning_rate": (2e-5, None),
    "num_train_epochs": (0, None),
    "train_steps": (1000, None),
    "max_length": (1024, None),
    "mask_prompt_loss": (True, None),
    "load_in_4bit": (False, None),
    "lora": (False, None),
    "lora_r": (32, None),
    "lora_alpha": (64, None),
    "lora_dropout": (0.05, None),
    "dtype": ("bfloat16", ["float32", "float16", "bfloat16"]),
    "gradient_accumulation_steps": (1, None),
    "warmup_ratio": (0.1, None),
    "logging_steps": (10, None),
    "eval_strategy": ("steps", ["no", "steps", "epoch"]),
    "eval_steps": (0.25, None),
    "save_steps": (0.25, None),
    "num_proc": (8, None),
    "truncation": ("right", ["filter", "right"]),
    "perbatch_cutoff": (True, None),
    "resp_cutoff_ratio": (0.0, None),
    "loss_weight_type": ("cart[geo_p:0.3]", None),
    "adaptor_name": ("adaptor", None),
    "log_to_wandb": (True, None),
}


def test_manifest_keeps_every_original_parameter_and_default():
    manifest = load_manifest()
    assert manifest["uniqueId"] == "dllm_trainer_multi_gpu"
    for key in (
        "name",
        "uniqueId",
        "description",
        "plugin-format",
        "type",
        "version",
        "files",
        "setup-script",
        "supported_hardware_architectures",
    ):
        assert key in manifest, key
    params = manifest["parameters"]
    for name, (default, enum) in ORIGINAL_PARAMETERS.items():
        assert params[name]["default"] == default, name
        if enum is not None:
            assert set(enum) <= set(params[name]["enum"]), name
        assert manifest["parameters_ui"][name]["ui:help"], name
    assert (
        params["lora_r"]["minimum"] == 4
        and params["lora_r"]["maximum"] == 64
        and params["lora_r"]["multipleOf"] == 4
    )
    assert params["lora_alpha"]["maximum"] == 128 and params["lora_alpha"]["multipleOf"] == 4
    assert params["lora_dropout"]["minimum"] == 0.05 and params["lora_dropout"]["maximum"] == 0.9
    assert (
        params["resp_cutoff_ratio"]["minimum"] == 0 and params["resp_cutoff_ratio"]["maximum"] == 1
    )


def test_manifest_files_exist():
    from dllm_plugin.config import PLUGIN_DIR

    for name in load_manifest()["files"]:
        assert (PLUGIN_DIR / name).exists(), name


def test_defaults_fill_every_parameter():
    cfg = build_job_config({"model_name": "m", "dataset_name": "d"})
    assert cfg.params == defaults()
    assert cfg.output_dir == "./output"
    assert cfg.model_name == "m" and cfg.adaptor_output_dir is None


@pytest.mark.parametrize(
    ("schema", "raw", "expected"),
    [
        ({"type": "boolean"}, "true", True),
        ({"type": "boolean"}, "False", False),
        ({"type": "boolean"}, "1", True),
        ({"type": "integer"}, "8", 8),
        ({"type": "integer"}, "8.0", 8),
        ({"type": "integer"}, 8.0, 8),
        ({"type": "number"}, "0.25", 0.25),
        ({"type": "number"}, "2e-5", 2e-5),
        ({"type": "string"}, 0, "0"),
        ({"type": "integer"}, "eight", "eight"),
    ],
)
def test_coerce(schema, raw, expected):
    value = coerce(raw, schema)
    assert value == expected and type(value) is type(expected)


def test_host_file_with_string_values(tmp_path):
    job = {
        "experiment": {"id": 1, "name": "alpha"},
        "config": {
            "model_name": "org/model",
            "dataset_name": "ds",
            "batch_size": "8",
            "lora": "true",
            "eval_steps": "0.25",
            "learning_rate": "3e-4",
            "job_id": 17,
            "template_name": "t",
            "some_host_field": "x",
        },
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    raw, experiment = read_input_file(path)
    cfg = build_job_config(raw, experiment)
    assert (cfg.batch_size, cfg.lora, cfg.eval_steps, cfg.learning_rate) == (8, True, 0.25, 3e-4)
    assert experiment["name"] == "alpha" and cfg.job_id == 17


def test_a_bare_config_without_the_config_key_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "flat.json"
    path.write_text(json.dumps({"model_name": "m", "dataset_name": "d", "train_steps": 5}))
    with pytest.raises(ConfigError, match='has no "config" object.*put dataset_name, model_name'):
        read_input_file(path)


def test_unknown_keys_warn_once(caplog):
    build_job_config({"model_name": "m", "dataset_name": "d", "zeta": 1, "alpha_x": 2})
    lines = [r.message for r in caplog.records if "ignoring config keys" in r.message]
    assert lines == ["ignoring config keys this plugin does not use: alpha_x, zeta"]


def test_every_violation_reported_at_once():
    with pytest.raises(ConfigError) as err:
        build_job_config(
            {
                "batch_size": "zero",
                "lora_r": 30,
                "lora_alpha": 200,
                "dtype": "fp8",
                "lora_dropout": 0.01,
                "truncation": "left",
                "resp_cutoff_ratio": 1.5,
                "learning_rate": 0,
                "loss_weight_type": "cart",
            }
        )
    problems = "\n".join(err.value.problems)
    expected = [
        "batch_size: 'zero' is not allowed: must be of type integer",
        "lora_r: 30 is not allowed: must be a multiple of 4",
        "lora_alpha: 200 is not allowed: must be <= 128",
        "dtype: 'fp8' is not allowed: must be one of 'float32', 'float16', 'bfloat16'",
        "lora_dropout: 0.01 is not allowed: must be >= 0.05",
        "truncation: 'left' is not allowed: must be one of 'filter', 'right'",
        "resp_cutoff_ratio: 1.5 is not allowed: must be <= 1",
        "learning_rate: 0 is not allowed: must be > 0",
        "loss_weight_type: 'cart' is not allowed: must have the form 'cart[geo_p:0.3]' or 'scheduler'",
    ]
    for line in expected:
        assert line in problems
    assert len(err.value.problems) == len(expected)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"load_in_4bit": True}, "load_in_4bit: true needs lora: true"),
        ({"merge_adaptor": True}, "merge_adaptor: true needs lora: true"),
        ({"dtype": "float16", "train_device": "cpu"}, "dtype: 'float16' needs train_device 'cuda'"),
        ({"gpu_ids": "0;1"}, "gpu_ids: '0;1' is not allowed"),
        ({"num_machines": 2}, "main_process_ip: must be set when num_machines > 1"),
        (
            {"num_machines": 2, "machine_rank": 2, "main_process_ip": "10.0.0.1"},
            "machine_rank: 2 is not allowed: must be < num_machines (2)",
        ),
        ({"loss_weight_type": "cart[geo_p:0.0]"}, "geo_p must be in (0, 1)"),
        (
            {"resume_from_checkpoint": "/no/such/checkpoint"},
            "resume_from_checkpoint: '/no/such/checkpoint' is not allowed",
        ),
    ],
)
def test_cross_field_errors(raw, fragment):
    with pytest.raises(ConfigError) as err:
        build_job_config(raw)
    assert any(fragment in p for p in err.value.problems), err.value.problems


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"config": 3}', "'config' in"),
    ],
)
def test_bad_input_files(tmp_path, content, fragment):
    path = tmp_path / "job.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        read_input_file(path)
    assert fragment in str(err.value)


def test_missing_input_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_input_file(tmp_path / "nope.json")


def test_the_form_order_places_every_parameter_once_and_ends_with_the_wildcard():
    manifest = load_manifest()
    order = manifest["parameters_ui"]["ui:order"]
    assert order[-1] == "*"
    placed = order[:-1]
    assert len(placed) == len(set(placed))
    assert set(placed) == set(manifest["parameters"])
    assert order[0] == "training_method"  # model/method first, expert knobs last
    assert placed.index("lora") < placed.index("train_steps") < placed.index("noise_schedule")


def test_every_config_attribute_the_code_reads_is_a_parameter_or_host_field():
    """`cfg.<name>` anywhere in the package must name a manifest parameter, a host
    field or a JobConfig member: a typo would otherwise read None or raise late."""
    import ast
    from dataclasses import fields
    from pathlib import Path

    from dllm_plugin.config import HOST_FIELDS, JobConfig

    known = set(load_manifest()["parameters"]) | set(HOST_FIELDS)
    known |= {f.name for f in fields(JobConfig)} | {"to_dict"}
    package = Path(__file__).resolve().parents[1] / "dllm_plugin"
    unknown = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "cfg"
                and node.attr not in known
            ):
                unknown.append(f"{path.name}:{node.lineno}: cfg.{node.attr}")
    assert not unknown, unknown
