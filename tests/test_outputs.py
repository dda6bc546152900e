"""Model folders appear complete or not at all, and names cannot leave their folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import dllm_plugin.atomic as atomic
from dllm_plugin.atomic import write_json
from dllm_plugin.config import build_job_config
from dllm_plugin.destinations import (
    MARKER,
    adaptor_dir,
    full_model_dir,
    model_short_name,
    planned_destinations,
    safe_name,
)
from dllm_plugin.errors import ConfigError
from dllm_plugin.outputs import host_model_record, save_model_folder

CFG = build_job_config({"model_name": "m", "adaptor_name": "a"})


def save(dest: Path, write) -> Path:
    return save_model_folder(dest, write, "model", CFG)


def old_folder(parent: Path) -> Path:
    """A model folder an earlier run of ours wrote (config, weights, record)."""
    dest = parent / "models" / "tiny_sums"
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{}")
    (dest / "model.safetensors").write_text("old weights")
    (dest / "index.json").write_text("old record")
    return dest


def contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_failure_while_writing_keeps_the_old_folder_and_no_temporaries(tmp_path):
    dest = old_folder(tmp_path)
    before = contents(dest)

    def write(tmp: Path) -> None:
        (tmp / "model.safetensors").write_text("half of the new weights")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save(dest, write)
    assert contents(dest) == before
    assert os.listdir(dest.parent) == ["tiny_sums"]


def test_failure_of_the_final_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    dest = old_folder(tmp_path)
    before = contents(dest)
    real_replace = os.replace

    def failing_replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        save(dest, lambda tmp: (tmp / "model.safetensors").write_text("new"))
    assert contents(dest) == before
    assert os.listdir(dest.parent) == ["tiny_sums"]


def test_success_replaces_the_whole_folder(tmp_path):
    dest = old_folder(tmp_path)
    (dest / "stale-shard.safetensors").write_text("from the old model")
    save(dest, lambda tmp: (tmp / "model.safetensors").write_text("new weights"))
    assert contents(dest).keys() == {"model.safetensors", MARKER}
    assert contents(dest)["model.safetensors"] == "new weights"
    assert os.listdir(dest.parent) == ["tiny_sums"]


def test_a_save_killed_between_the_renames_is_repaired_next_time(tmp_path):
    """A SIGKILL leaves what no exception handler could clean: the next save repairs it."""
    dest = old_folder(tmp_path)
    before = contents(dest)
    os.replace(dest, dest.parent / ".tiny_sums.old-1234abcd")  # killed after the first rename
    (dest.parent / ".tiny_sums.tmp-5678abcd").mkdir()  # and its half-written temporary
    atomic.recover_folder(dest)
    assert contents(dest) == before
    assert os.listdir(dest.parent) == ["tiny_sums"]


def test_write_json_replaces_in_one_step(tmp_path):
    path = tmp_path / "run_summary.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2} and os.listdir(tmp_path) == [path.name]


# ---- names ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["../../evil", "/etc/passwd", "..\\..\\evil", ".hidden", "a/../../b"]
)
def test_adaptor_name_cannot_escape(tmp_path, name):
    out, models = tmp_path / "out", tmp_path / "workspace" / "models"
    cfg = build_job_config(
        {"adaptor_name": name, "model_name": "org/Model-7B", "output_dir": str(out)}
    )
    adaptor, model = adaptor_dir(cfg), full_model_dir(cfg, models)
    assert adaptor == out / "adaptors" / safe_name(name)
    assert model == models / f"Model-7B_{safe_name(name)}"
    for path, parent in ((adaptor, out / "adaptors"), (model, models)):
        assert path.resolve().parent == parent.resolve()


def test_host_adaptor_dir_built_from_a_bad_name_is_kept_inside(tmp_path):
    """The host appends the adaptor name as typed: <ws>/adaptors/<model>/../../evil."""
    base = tmp_path / "workspace" / "adaptors" / "Model-7B"
    cfg = build_job_config(
        {
            "adaptor_name": "../../evil",
            "model_name": "org/Model-7B",
            "adaptor_output_dir": f"{base}/../../evil",
        }
    )
    assert adaptor_dir(cfg) == base / "evil"
    plain = build_job_config({"adaptor_name": "my run", "adaptor_output_dir": str(base / "my run")})
    assert adaptor_dir(plain) == base / "my run"  # a plain name stays as the host wrote it


def test_names_with_nothing_usable_fail_before_training(tmp_path):
    cfg = build_job_config(
        {"adaptor_name": "../..", "model_name": "m", "output_dir": str(tmp_path)}
    )
    with pytest.raises(ConfigError, match="adaptor_name"):
        planned_destinations(cfg, None)


def test_model_short_name_and_record():
    assert model_short_name("org/Model-7B") == "Model-7B"
    assert model_short_name("/models/../../x/") == "x"
    record = host_model_record("Model-7B_run", "LLaDAModelLM", "a test")
    assert record["model_id"] == "TransformerLab/Model-7B_run" and record["model_filename"] == "."
    assert record["local_model"] is True
    assert record["json_data"] == {
        "uniqueID": "TransformerLab/Model-7B_run",
        "name": "Model-7B_run",
        "model_filename": ".",
        "description": "a test",
        "source": "transformerlab",
        "architecture": "LLaDAModelLM",
        "huggingface_repo": "",
    }


def test_loss_plot_from_log_history(tmp_path):
    from dllm_plugin.plots import loss_points, plot_loss_curves

    history = [
        {"loss": 3.0, "step": 1},
        {"loss": 2.0, "step": 2},
        {"eval_loss": 2.5, "step": 2},
        {"train_loss": 2.5, "step": 2},
    ]
    assert loss_points(history, "loss") == ([1, 2], [3.0, 2.0])
    path = plot_loss_curves(history, tmp_path)
    assert path == tmp_path / "loss_curves.png" and path.read_bytes()[:4] == b"\x89PNG"
    assert os.listdir(tmp_path) == ["loss_curves.png"]
    assert plot_loss_curves([{"train_runtime": 1.0, "step": 0}], tmp_path / "none") is None
