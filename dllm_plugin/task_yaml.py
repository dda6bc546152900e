"""task.yaml, the Transformer Lab task definition, generated from the manifest.

    python -m dllm_plugin.task_yaml            # write task.yaml beside index.json
    python -m dllm_plugin.task_yaml --check    # exit 1 when task.yaml is not what index.json gives
    python -m dllm_plugin.task_yaml --github-repo-url https://github.com/OWNER/REPO

index.json stays the one source of parameters: each of its parameters becomes a task
parameter in the schema the app's form reads (type, default, min, max, step, options,
title; ../shared/facts/transformerlab-tasks.md, section 5), in the form's order
(`parameters_ui["ui:order"]`), after the host fields a task has to ask for itself
(model and dataset with the app's pickers, the templates). Only the schema's top-level
keys are written (the app rejects any other with a 400); the GitHub fields are kept
from the existing file or taken from the flags, since the import needs them in the
file itself and only the publisher knows them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from .config import MANIFEST_PATH, PLUGIN_DIR

TASK_YAML = PLUGIN_DIR / "task.yaml"
DEMO_JOB = PLUGIN_DIR / "dllm_plugin" / "demo" / "job.json"
HEADER = (
    "# Generated from index.json by `python -m dllm_plugin.task_yaml`; edit index.json and\n"
    "# run it again (a test fails when this file and index.json disagree).\n"
)
# No github_repo_dir: the task is the repository's root (with a subfolder the app would
# copy only that folder into the job, without the code `run` starts).
GITHUB_FIELDS = ("github_repo_url", "github_repo_branch")
# The task's commands. setup runs in the job's venv (the app's own torch stays; our
# package upgrades transformers, accelerate, peft and datasets there: info.md).
# uv venvs (the Local provider's) have no pip: uv installs there, else pip (made first).
SETUP = """\
extras=wandb,demo
if command -v nvidia-smi >/dev/null 2>&1; then extras=quant,$extras; fi
if command -v uv >/dev/null 2>&1; then uv pip install ".[$extras]"
else python -m pip --version >/dev/null 2>&1 || python -m ensurepip --upgrade; python -m pip install ".[$extras]"; fi
"""
RUN = "exec python main.py"  # exec: the trap must see python's own exit status
ENVS = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def host_parameters() -> dict[str, dict[str, Any]]:
    """What the plugin host used to fill in and a task must ask for: the model and the
    dataset (the app's registry pickers; defaults: the embedded demo's) and templates."""
    demo = json.loads(DEMO_JOB.read_text(encoding="utf-8"))["config"]
    demo_data = (DEMO_JOB.parent / demo["dataset_name"]).relative_to(PLUGIN_DIR)
    return {
        "model_name": {
            "title": "Model (a hub id, a local folder or one of this app's models)",
            "type": "string",
            "default": demo["model_name"],
            "ui_widget": "lab_model_select",
        },
        "dataset_name": {
            "title": "Dataset (a hub id, a local file or folder, or one of this app's datasets)",
            "type": "string",
            "default": demo_data.as_posix(),
            "ui_widget": "lab_dataset_select",
        },
        "input_template": {
            "title": "Prompt template (Jinja2; empty: by columns)",
            "type": "string",
            "default": "",
        },
        "output_template": {
            "title": "Answer template (Jinja2; empty: by columns)",
            "type": "string",
            "default": "",
        },
        "instruction_template": {
            "title": "System message (optional)",
            "type": "string",
            "default": "",
        },
    }


def task_parameter(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """One manifest parameter in the app's schema (JSON-Schema names mapped to its own)."""
    out: dict[str, Any] = {"title": schema.get("title", name), "type": schema["type"]}
    out["default"] = schema["default"]
    if "enum" in schema:
        out["options"] = list(schema["enum"])
    if "minimum" in schema:
        out["min"] = schema["minimum"]
    if "maximum" in schema:
        out["max"] = schema["maximum"]
    if "multipleOf" in schema:
        out["step"] = schema["multipleOf"]
    return out


def form_order(manifest: dict[str, Any]) -> list[str]:
    """The manifest's parameters in the form's order; "*" stands for the rest."""
    names = list(manifest["parameters"])
    order = [n for n in manifest.get("parameters_ui", {}).get("ui:order", []) if n in names]
    return order + [n for n in names if n not in order]


def task_definition(manifest: dict[str, Any], github: dict[str, str]) -> dict[str, Any]:
    parameters = host_parameters()
    for name in form_order(manifest):
        parameters[name] = task_parameter(name, manifest["parameters"][name])
    return {
        "name": "dllm-trainer",
        **github,
        "envs": dict(ENVS),
        "setup": SETUP,
        "run": RUN,
        "parameters": parameters,
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line text (the setup script) as a literal block, as a person would write it."""


_Dumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None
    ),
)


def render(manifest: dict[str, Any], github: dict[str, str]) -> str:
    definition = task_definition(manifest, github)
    body = yaml.dump(definition, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    return HEADER + body


def github_fields(path: Path) -> dict[str, str]:
    """The GitHub fields of an existing task.yaml (kept when it is generated again)."""
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {k: str(data[k]) for k in GITHUB_FIELDS if data.get(k)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dllm_plugin.task_yaml", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--manifest", type=Path, default=MANIFEST_PATH)
    parser.add_argument("--output", type=Path, default=TASK_YAML)
    parser.add_argument("--check", action="store_true", help="fail when the file differs")
    for field in GITHUB_FIELDS:
        parser.add_argument(
            f"--{field.replace('_', '-')}", dest=field, help="written into the file"
        )
    args = parser.parse_args(argv)
    manifest = json.loads(args.manifest.read_text(encoding="utf-8"))
    github = github_fields(args.output)
    github.update({k: getattr(args, k) for k in GITHUB_FIELDS if getattr(args, k)})
    text = render(manifest, github)
    current = args.output.read_text(encoding="utf-8") if args.output.is_file() else ""
    if args.check:
        if current != text:
            print(
                f"{args.output} is out of date with {args.manifest}: run python -m dllm_plugin.task_yaml",
                file=sys.stderr,
            )
            return 1
        return 0
    if current != text:
        args.output.write_text(text, encoding="utf-8")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
