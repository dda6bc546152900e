"""task.yaml: generated from index.json, in the schema the app accepts and its form reads."""

from __future__ import annotations

import json

import yaml

from dllm_plugin import task_yaml
from dllm_plugin.config import MANIFEST_PATH, build_job_config, defaults
from dllm_plugin.hosts.task import unwrap_parameter

# TaskYamlSpec (api/transformerlab/schemas/task.py:87-108, extra="forbid").
SCHEMA_KEYS = {
    "name",
    "run",
    "setup",
    "envs",
    "resources",
    "github_repo_url",
    "github_repo_dir",
    "github_repo_branch",
    "parameters",
    "sweeps",
    "minutes_requested",
}
FORM_KEYS = {"type", "default", "min", "max", "step", "options", "enum", "ui_widget", "title"}


def committed() -> dict:
    return yaml.safe_load(task_yaml.TASK_YAML.read_text(encoding="utf-8"))


def test_task_yaml_is_what_index_json_gives(capsys):
    assert task_yaml.main(["--check"]) == 0, capsys.readouterr().err


def test_a_changed_index_json_makes_the_check_fail(tmp_path):
    manifest = json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))
    manifest["parameters"]["batch_size"]["default"] = 8
    changed = tmp_path / "index.json"
    changed.write_text(json.dumps(manifest), encoding="utf-8")
    copy = tmp_path / "task.yaml"
    copy.write_text(task_yaml.TASK_YAML.read_text(encoding="utf-8"), encoding="utf-8")
    args = ["--manifest", str(changed), "--output", str(copy)]
    assert task_yaml.main([*args, "--check"]) == 1
    assert task_yaml.main(args) == 0  # regenerated from the changed manifest
    assert yaml.safe_load(copy.read_text())["parameters"]["batch_size"]["default"] == 8
    assert task_yaml.main([*args, "--check"]) == 0


def test_only_the_schemas_keys_strings_in_envs_and_run_execs():
    task = committed()
    assert set(task) <= SCHEMA_KEYS
    assert all(isinstance(v, str) for v in task["envs"].values())
    assert task["run"].startswith("exec python ")
    assert "{{secret." not in task_yaml.TASK_YAML.read_text()  # launches without any secret


def test_every_parameter_with_the_manifests_default_in_the_forms_schema():
    manifest = json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))
    parameters = committed()["parameters"]
    assert set(manifest["parameters"]) <= set(parameters)
    for name, schema in manifest["parameters"].items():
        entry = parameters[name]
        assert set(entry) <= FORM_KEYS, name
        assert entry["default"] == schema["default"] and type(entry["default"]) is type(
            schema["default"]
        )
        assert entry["type"] == schema["type"] and entry["title"] == schema["title"]
        assert entry.get("options") == schema.get("enum"), name
        assert entry.get("min") == schema.get("minimum") and entry.get("max") == schema.get(
            "maximum"
        )
    order = [n for n in manifest["parameters_ui"]["ui:order"] if n != "*"]
    assert [n for n in parameters if n in manifest["parameters"]][: len(order)] == order
    assert parameters["model_name"]["ui_widget"] == "lab_model_select"
    assert parameters["dataset_name"]["ui_widget"] == "lab_dataset_select"


def test_the_tasks_own_defaults_make_a_valid_job_with_the_manifests_defaults():
    """What a raw API caller sends (the schema dicts themselves) is the default job."""
    raw = {name: unwrap_parameter(entry) for name, entry in committed()["parameters"].items()}
    cfg = build_job_config(raw)
    assert cfg.params == defaults()
    assert (task_yaml.PLUGIN_DIR / cfg.dataset_name).is_file()  # the demo data, as imported
