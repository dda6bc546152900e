"""task.yaml: generated from index.json, in the schema the app accepts and its form reads."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

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


def test_only_the_schemas_keys_strings_in_envs_and_run_execs():
    task = committed()
    assert set(task) <= SCHEMA_KEYS
    assert all(isinstance(v, str) for v in task["envs"].values())
    assert task["run"].startswith("exec python ")
    assert "{{secret." not in task_yaml.TASK_YAML.read_text()  # launches without any secret


# The form's name for each JSON-Schema keyword of the manifest (QM/types.ts; facts, section 5).
FORM_NAMES = {
    "title": "title",
    "enum": "options",
    "minimum": "min",
    "maximum": "max",
    "multipleOf": "step",
}
HOST_PARAMETERS = {
    "model_name",
    "dataset_name",
    "input_template",
    "output_template",
    "instruction_template",
}


def drift(manifest: dict, parameters: dict) -> list[str]:
    """Every way the task's parameters disagree with the manifest, written out here
    independently of the generator: names, order, type, default (value and JSON type),
    and each keyword the form understands."""
    problems = []
    names = list(manifest["parameters"])
    if set(parameters) - set(names) != HOST_PARAMETERS:
        problems.append(f"names: {sorted(set(parameters) ^ (set(names) | HOST_PARAMETERS))}")
    order = [n for n in manifest.get("parameters_ui", {}).get("ui:order", []) if n in names]
    order += [n for n in names if n not in order]
    if [n for n in parameters if n in names] != order:
        problems.append("order")
    for name, schema in manifest["parameters"].items():
        entry = parameters.get(name)
        if entry is None:
            continue
        if not set(entry) <= FORM_KEYS:
            problems.append(f"{name}: keys {sorted(set(entry) - FORM_KEYS)}")
        if entry.get("type") != schema["type"]:
            problems.append(f"{name}: type")
        default = entry.get("default")
        if default != schema["default"] or type(default) is not type(schema["default"]):
            problems.append(f"{name}: default {default!r} != {schema['default']!r}")
        for keyword, form_name in FORM_NAMES.items():
            expected = schema.get(keyword, name if keyword == "title" else None)
            if entry.get(form_name) != expected:
                problems.append(f"{name}: {form_name} {entry.get(form_name)!r} != {expected!r}")
    return problems


def test_the_committed_parameters_are_the_manifests():
    manifest = json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))
    parameters = committed()["parameters"]
    assert drift(manifest, parameters) == []
    assert parameters["model_name"]["ui_widget"] == "lab_model_select"
    assert parameters["dataset_name"]["ui_widget"] == "lab_dataset_select"


def changed_manifests() -> dict[str, dict]:
    """Copies of index.json, each changed the way an edit would change it."""
    original = json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))
    edits = {
        "a default": lambda m: m["parameters"]["batch_size"].update(default=8),
        "a float default": lambda m: m["parameters"]["learning_rate"].update(default=3e-5),
        "a maximum": lambda m: m["parameters"]["lora_r"].update(maximum=128),
        "a minimum": lambda m: m["parameters"]["max_length"].update(minimum=16),
        "a step": lambda m: m["parameters"]["lora_r"].update(multipleOf=8),
        "an option": lambda m: m["parameters"]["dtype"]["enum"].append("float64"),
        "a title": lambda m: m["parameters"]["seed"].update(title="Seed"),
        "a type": lambda m: m["parameters"]["eval_steps"].update(type="integer", default=10),
        "a new parameter": lambda m: m["parameters"].update(
            new_knob={"type": "integer", "default": 1, "title": "New knob"}
        ),
        "a removed parameter": lambda m: m["parameters"].pop("group_by_length"),
        "the order": lambda m: m["parameters_ui"]["ui:order"].insert(
            0, m["parameters_ui"]["ui:order"].pop(m["parameters_ui"]["ui:order"].index("seed"))
        ),
    }
    changed = {}
    for what, edit in edits.items():
        manifest = json.loads(json.dumps(original))
        edit(manifest)
        changed[what] = manifest
    return changed


@pytest.mark.parametrize("what", list(changed_manifests()))
def test_a_changed_index_json_is_caught_and_regenerating_fixes_it(tmp_path, capsys, what):
    """The drift check fails on the committed task.yaml for each kind of edit to a copy of
    index.json (so it would fail on the real one), and so does the generator's --check;
    generating from the changed copy gives a task.yaml without drift."""
    manifest = changed_manifests()[what]
    assert drift(manifest, committed()["parameters"]) != [], what
    changed = tmp_path / "index.json"
    changed.write_text(json.dumps(manifest), encoding="utf-8")
    output = tmp_path / "task.yaml"
    shutil.copyfile(task_yaml.TASK_YAML, output)
    args = ["--manifest", str(changed), "--output", str(output)]
    assert task_yaml.main([*args, "--check"]) == 1
    assert "is out of date" in capsys.readouterr().err
    assert task_yaml.main(args) == 0
    assert drift(manifest, yaml.safe_load(output.read_text(encoding="utf-8"))["parameters"]) == []
    assert task_yaml.main([*args, "--check"]) == 0


def test_setup_installs_this_project_with_extras_it_declares():
    """setup is valid bash, installs the checkout (`.`), and names only extras that
    pyproject.toml defines (a misspelt extra is a warning, not an error, to pip and uv)."""
    setup = committed()["setup"]
    subprocess.run(["bash", "-n", "-c", setup], check=True)
    extras = re.search(r"^extras=([\w,]+)$", setup, re.M).group(1).split(",") + ["quant"]
    declared = tomllib.loads((task_yaml.PLUGIN_DIR / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(extras) <= set(declared)
    assert '".[$extras]"' in setup


def test_the_tasks_own_defaults_make_a_valid_job_with_the_manifests_defaults():
    """What a raw API caller sends (the schema dicts themselves) is the default job."""
    raw = {name: unwrap_parameter(entry) for name, entry in committed()["parameters"].items()}
    cfg = build_job_config(raw)
    assert cfg.params == defaults()
    assert (task_yaml.PLUGIN_DIR / cfg.dataset_name).is_file()  # the demo data, as imported
