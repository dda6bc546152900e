"""The launcher's decisions, generated accelerate configs and failure reporting (no GPU).

Where it matters, the generated command is fed to accelerate's own argument parser and
validation, so a config accelerate would read differently (e.g. one process instead of
two) fails here rather than on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from dllm_plugin import launch
from dllm_plugin.config import build_job_config
from dllm_plugin.errors import ConfigError
from dllm_plugin.hosts import Host
from dllm_plugin.launch import host_for_this_process, maybe_relaunch
from dllm_plugin.launch import plan as launch_plan
from dllm_plugin.launch import supervise as sup
from dllm_plugin.launch.plan import LaunchPlan, accelerate_config, describe_plan, plan_launch
from dllm_plugin.launch.supervise import (
    ExceptionLines,
    LaunchResult,
    Streamed,
    child_environment,
    launch_command,
    launch_result,
    record_failure,
    run_streaming,
)


def job(**params):
    base = {"model_name": "m", "dataset_name": "d.jsonl", "dtype": "float32"}
    return build_job_config({**base, **params})


def cli_args(**kw) -> argparse.Namespace:
    values = {
        "input_file": None,
        "plugin_dir": None,
        "experiment_name": None,
        "job_id": None,
        "launched_with_accelerate": False,
    }
    return argparse.Namespace(**{**values, **kw})


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No inherited distributed or GPU-selection variables; a fixed GPU count."""
    for name in (
        "LOCAL_RANK",
        "WORLD_SIZE",
        "RANK",
        "CUDA_VISIBLE_DEVICES",
        sup.FAILURE_DIR_ENV,
    ):
        monkeypatch.setenv(name, "")  # recorded, so whatever a test sets is undone after it
        monkeypatch.delenv(name)
    monkeypatch.setattr(launch_plan, "cuda_device_count", lambda: 4)
    monkeypatch.setattr(launch_plan, "_deepspeed_installed", lambda: True)


def generated(cfg, tmp_path, args=None):
    """(plan, config dict, command) as maybe_relaunch would build them."""
    plan = plan_launch(cfg)
    config = accelerate_config(plan, cfg)
    path = tmp_path / "accelerate_config.yaml"
    path.write_text(yaml.safe_dump(config))
    command = launch_command(plan, path, tmp_path / "job.json", args or cli_args())
    return plan, config, command


def accelerate_view(command: list[str]) -> argparse.Namespace:
    """How `accelerate launch` 1.x reads our command (its parser and validation)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    args, _defaults, _mp = _validate_launch_command(launch_command_parser().parse_args(command[3:]))
    return args


# ---- when to launch ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "params",
    [
        {"train_device": "cpu"},
        {"train_device": "cpu", "num_processes": 1, "distributed_strategy": "fsdp"},
        {"train_device": "cuda", "gpu_ids": "3"},
    ],
)
def test_single_process_trains_here(params, capsys):
    assert maybe_relaunch(job(**params), Path("job.json"), cli_args()) is None
    assert "training plan (this process):" in capsys.readouterr().out


def test_cuda_auto_with_one_gpu_trains_here(monkeypatch):
    monkeypatch.setattr(launch_plan, "cuda_device_count", lambda: 1)
    assert not plan_launch(job(train_device="cuda")).needs_launcher


def test_one_chosen_gpu_is_made_visible_without_touching_cuda(monkeypatch):
    def no_cuda():
        raise AssertionError("CUDA queried before CUDA_VISIBLE_DEVICES was set")

    monkeypatch.setattr(launch_plan, "cuda_device_count", no_cuda)
    assert maybe_relaunch(job(train_device="cuda", gpu_ids="2"), Path("j"), cli_args()) is None
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"


@pytest.mark.parametrize("env", [{"LOCAL_RANK": "0"}, {"WORLD_SIZE": "2"}])
def test_already_distributed_trains_here(env, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert maybe_relaunch(job(train_device="cpu", num_processes=2), Path("j"), cli_args()) is None


def test_launched_child_trains_here():
    args = cli_args(launched_with_accelerate=True)
    assert maybe_relaunch(job(train_device="cpu", num_processes=2), Path("j"), args) is None


# ---- cpu --------------------------------------------------------------------------------
def test_cpu_processes_use_the_multi_gpu_launcher_with_gloo(tmp_path):
    args = cli_args(plugin_dir="/p", experiment_name="exp", job_id="7", input_file="x")
    plan, config, command = generated(job(train_device="cpu", num_processes=2), tmp_path, args)
    assert plan.num_processes == 2
    assert config["distributed_type"] == "MULTI_CPU" and config["use_cpu"] is True
    assert config["main_process_port"] == 0  # any free port: parallel jobs never clash
    assert command[:5] == [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(tmp_path / "accelerate_config.yaml"),
    ]
    assert "--multi_gpu" in command and "--cpu" not in command
    tail = command[command.index(str(sup.MAIN_SCRIPT)) :]
    assert tail == [
        str(sup.MAIN_SCRIPT),
        "--input_file",
        str((tmp_path / "job.json").resolve()),
        "--launched_with_accelerate",
        "--plugin_dir",
        "/p",
        "--experiment_name",
        "exp",
        "--job_id",
        "7",
    ]
    seen = accelerate_view(command)
    assert seen.multi_gpu and not seen.cpu and seen.num_processes == 2
    from accelerate.utils.launch import prepare_multi_gpu_env

    prepare_multi_gpu_env(seen)
    assert seen.nproc_per_node == "2"  # two ranks, not the silent single process


def test_cpu_environment_shares_cores(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    plan = plan_launch(job(train_device="cpu", num_processes=4))
    env = child_environment(plan, tmp_path)
    assert env["OMP_NUM_THREADS"] == "4"
    assert "CUDA_VISIBLE_DEVICES" not in env


# ---- cuda -------------------------------------------------------------------------------
def test_cuda_auto_uses_every_visible_gpu(tmp_path):
    plan, config, command = generated(job(train_device="cuda", dtype="bfloat16"), tmp_path)
    assert plan.num_processes == 4 and plan.visible_devices is None
    assert config["distributed_type"] == "MULTI_GPU" and config["mixed_precision"] == "bf16"
    assert "--multi_gpu" not in command  # the config says MULTI_GPU
    seen = accelerate_view(command)
    assert seen.multi_gpu and seen.num_processes == 4 and seen.mixed_precision == "bf16"
    assert "CUDA_VISIBLE_DEVICES" not in child_environment(plan, tmp_path)


def test_cuda_gpu_list_sets_visible_devices(tmp_path):
    plan, config, _ = generated(job(train_device="cuda", gpu_ids="0, 2", dtype="float16"), tmp_path)
    assert plan.num_processes == 2 and config["num_processes"] == 2
    assert config["gpu_ids"] == "all" and config["mixed_precision"] == "fp16"
    assert child_environment(plan, tmp_path)["CUDA_VISIBLE_DEVICES"] == "0,2"


def test_gpu_ids_index_the_already_visible_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert plan_launch(job(train_device="cuda", gpu_ids="0,2")).visible_devices == "4,6"


@pytest.mark.parametrize(
    ("gpu_ids", "fragment"), [("0,5", r"GPU 5 does not exist: 4 GPU\(s\)"), ("1,1", "twice")]
)
def test_bad_gpu_ids(gpu_ids, fragment):
    with pytest.raises(ConfigError, match=fragment):
        plan_launch(job(train_device="cuda", gpu_ids=gpu_ids))


def test_num_processes_is_ignored_for_cuda(caplog):
    assert plan_launch(job(train_device="cuda", num_processes=3)).num_processes == 4
    assert "ignored" in caplog.text


# ---- strategies -------------------------------------------------------------------------
def test_fsdp_config(tmp_path):
    _, config, command = generated(job(train_device="cuda", distributed_strategy="fsdp"), tmp_path)
    assert config["distributed_type"] == "FSDP"
    fsdp = config["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    seen = accelerate_view(command)
    assert seen.use_fsdp and seen.num_processes == 4
    from accelerate.utils.launch import prepare_multi_gpu_env

    env = prepare_multi_gpu_env(seen)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"


@pytest.mark.parametrize(("strategy", "stage"), [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_deepspeed_config(strategy, stage, tmp_path):
    cfg = job(
        train_device="cuda",
        distributed_strategy=strategy,
        gradient_accumulation_steps=4,
        max_grad_norm=0.5,
    )
    _, config, command = generated(cfg, tmp_path)
    ds = config["deepspeed_config"]
    assert config["distributed_type"] == "DEEPSPEED" and ds["zero_stage"] == stage
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["deepspeed_multinode_launcher"] == "standard"
    assert ("zero3_init_flag" in ds) == (stage == 3)
    seen = accelerate_view(command)
    assert seen.use_deepspeed and seen.zero_stage == stage


def test_deepspeed_must_be_installed(monkeypatch):
    monkeypatch.setattr(launch_plan, "_deepspeed_installed", lambda: False)
    with pytest.raises(ConfigError, match="pip install deepspeed"):
        plan_launch(job(train_device="cuda", distributed_strategy="deepspeed_zero2"))


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        (
            {"train_device": "cpu", "num_processes": 2, "distributed_strategy": "fsdp"},
            "needs train_device 'cuda'",
        ),
        (
            {
                "train_device": "cuda",
                "distributed_strategy": "fsdp",
                "lora": True,
                "load_in_4bit": True,
            },
            "load_in_4bit",
        ),
        ({"train_device": "tpu", "num_machines": 2, "main_process_ip": "10.0.0.1"}, "TPU"),
    ],
)
def test_unsupported_combinations(params, fragment):
    with pytest.raises(ConfigError, match=fragment):
        plan_launch(job(**params))


# ---- multi-node and tpu -----------------------------------------------------------------
def test_multi_node_parameters_pass_through(tmp_path):
    cfg = job(
        train_device="cuda",
        gpu_ids="0,1",
        num_machines=2,
        machine_rank=1,
        main_process_ip="10.0.0.1",
        main_process_port=29555,
    )
    plan, config, command = generated(cfg, tmp_path)
    assert plan.num_processes == 4
    assert config["num_processes"] == 4 and config["num_machines"] == 2
    assert config["machine_rank"] == 1
    assert (config["main_process_ip"], config["main_process_port"]) == ("10.0.0.1", 29555)
    seen = accelerate_view(command)
    from accelerate.utils.launch import prepare_multi_gpu_env

    prepare_multi_gpu_env(seen)
    assert (seen.nproc_per_node, seen.nnodes, seen.node_rank) == ("2", "2", 1)
    assert (seen.rdzv_backend, seen.rdzv_endpoint) == ("static", "10.0.0.1:29555")
    assert "rank 1 of 2, main process 10.0.0.1:29555" in describe_plan(plan, cfg, command)


def test_one_gpu_per_machine_still_launches_for_multi_node(monkeypatch):
    monkeypatch.setattr(launch_plan, "cuda_device_count", lambda: 1)
    cfg = job(train_device="cuda", num_machines=2, main_process_ip="h0")
    plan = plan_launch(cfg)
    assert plan.needs_launcher and plan.num_processes == 2


def test_tpu_passes_through(tmp_path):
    plan, config, command = generated(job(train_device="tpu", dtype="bfloat16"), tmp_path)
    assert plan.needs_launcher and config["distributed_type"] == "XLA"
    assert "--multi_gpu" not in command
    assert accelerate_view(command).tpu


# ---- the plan and the launch ------------------------------------------------------------
def test_plan_names_processes_devices_strategy_batch_steps_precision(tmp_path):
    cfg = job(
        train_device="cuda",
        gpu_ids="0,2",
        batch_size=2,
        gradient_accumulation_steps=3,
        train_steps=50,
        dtype="bfloat16",
    )
    plan, _, command = generated(cfg, tmp_path)
    text = describe_plan(plan, cfg, command, "x: 1\n")
    for fragment in (
        "processes     2",
        "cuda: GPU 0,2 (CUDA_VISIBLE_DEVICES=0,2)",
        "strategy      ddp",
        "global batch  12 = batch_size 2 x 2 process(es) x gradient_accumulation_steps 3",
        "steps         50 optimizer steps",
        "precision     bfloat16 (accelerate mixed_precision bf16)",
        "accelerate.commands.launch",
    ):
        assert fragment in text


def test_maybe_relaunch_writes_config_runs_and_reports(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_run(command, env, on_tick=None):
        config_file = Path(command[command.index("--config_file") + 1])
        seen["config"] = yaml.safe_load(config_file.read_text())
        seen["leftovers"] = [p.name for p in config_file.parent.iterdir() if ".tmp-" in p.name]
        seen["env"] = env
        Path(env[sup.FAILURE_DIR_ENV], "rank-1.txt").write_text("DataError: no data")
        return Streamed(1, ["FAILED: DataError: no data"])

    monkeypatch.setattr(launch, "run_streaming", fake_run)
    monkeypatch.setenv("_TFL_ORG_ID", "team-a")
    result = maybe_relaunch(job(train_device="cpu", num_processes=2), tmp_path / "j", cli_args())
    assert result == LaunchResult(1, "rank 1: DataError: no data")
    assert seen["config"]["num_processes"] == 2 and seen["leftovers"] == []
    assert seen["env"]["_TFL_ORG_ID"] == "team-a"
    assert not Path(seen["env"][sup.FAILURE_DIR_ENV]).exists()  # temp folder cleaned up
    assert "launch plan:" in capsys.readouterr().out


def test_children_get_the_parents_sys_path_in_its_order(tmp_path, monkeypatch):
    """Not PYTHONPATH: that would put the parent's folders ahead of the venv's packages."""
    sdk, after_venv = tmp_path / "sdk", tmp_path / "host-packages"
    monkeypatch.setattr(sys, "path", [str(sdk), *sys.path, str(after_venv)])
    monkeypatch.setenv("PYTHONPATH", "/users/own")
    env = child_environment(plan_launch(job(train_device="cpu", num_processes=2)), tmp_path)
    assert json.loads(env[sup.PARENT_SYS_PATH_ENV]) == sys.path
    assert env["PYTHONPATH"] == "/users/own"  # left as the user set it
    assert env[sup.FAILURE_DIR_ENV] == str(tmp_path) and env["PYTHONUNBUFFERED"] == "1"


# ---- failures ---------------------------------------------------------------------------
def write_reason(folder: Path, rank: int, text: str, mtime_ns: int) -> None:
    path = folder / f"rank-{rank}.txt"
    path.write_text(text)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_first_reason_wins(tmp_path):
    write_reason(tmp_path, 0, "RuntimeError: connection closed by peer", 2_000)
    write_reason(tmp_path, 1, "OutOfMemoryError: CUDA out of memory", 1_000)
    assert (
        launch_result(tmp_path, Streamed(1, [])).reason
        == "rank 1: OutOfMemoryError: CUDA out of memory"
    )


def test_same_reason_names_lowest_rank(tmp_path):
    write_reason(tmp_path, 0, "DataError: x", 2_000)
    write_reason(tmp_path, 1, "DataError: x", 1_000)
    assert launch_result(tmp_path, Streamed(1, [])).reason == "rank 0: DataError: x"


@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        (["FAILED: boom", "====="], "boom"),
        (["Traceback", "Killed", "====="], "training processes exited with status 137: Killed"),
        ([], "training processes exited with status 137"),
    ],
)
def test_fallback_reasons(tmp_path, tail, reason):
    assert launch_result(tmp_path, Streamed(137, tail)) == LaunchResult(137, reason)


def test_success_and_clean_stop(tmp_path):
    assert launch_result(tmp_path, Streamed(0, ["whatever"])) == LaunchResult(0)
    (tmp_path / sup.STOPPED_MARKER).write_text("5")
    assert launch_result(tmp_path, Streamed(1, ["SignalException"])) == LaunchResult(
        0, stopped=True
    )


# A real run (abridged): rank 0 died importing an older transformers that PYTHONPATH put
# ahead of the venv; torchelastic killed rank 1 and printed its own error.
DIED_AT_IMPORT = """\
Traceback (most recent call last):
  File "/repo/main.py", line 22, in <module>
    main()
  File "/repo/dllm_plugin/models/__init__.py", line 12, in <module>
    from transformers import (
  File "/host/packages/transformers/__init__.py", line 1, in <module>
    raise ImportError("cannot import name 'initialization' from 'transformers'")
ImportError: cannot import name 'initialization' from 'transformers' (/host/packages/transformers/__init__.py)
W1201 00:09:34.455000 17389 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 17393 closing signal SIGTERM
E1201 00:09:34.470000 17389 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 0 (pid: 17392) of binary: /venv/bin/python
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
/repo/main.py FAILED
------------------------------------------------------------
Failures:
[1]:
  rank      : 1 (local_rank: 1)
  exitcode  : -15 (pid: 17393)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 17393
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 17392)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================"""


def test_a_child_that_died_before_writing_its_reason_is_reported_by_its_exception():
    lines = ExceptionLines()
    for line in DIED_AT_IMPORT.splitlines():
        lines.feed(line + "\n")
    expected = (
        "ImportError: cannot import name 'initialization' from 'transformers' "
        "(/host/packages/transformers/__init__.py)"
    )
    assert lines.last == expected
    streamed = Streamed(1, DIED_AT_IMPORT.splitlines()[-5:], lines.last)
    assert launch_result(Path("/nonexistent"), streamed).reason == expected


def test_record_failure(tmp_path, monkeypatch):
    record_failure("nowhere to write")  # no launcher: nothing happens
    monkeypatch.setenv(sup.FAILURE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "3")
    record_failure("ValueError: bad")
    assert (tmp_path / "rank-3.txt").read_text() == "ValueError: bad"
    assert [p.name for p in tmp_path.iterdir()] == ["rank-3.txt"]


def test_run_streaming_copies_output_and_status(capfd):
    code = "import sys; print('one'); print('two'); sys.exit(3)"
    ticks = []
    streamed = run_streaming(
        [sys.executable, "-c", code], dict(os.environ), on_tick=lambda: ticks.append(1)
    )
    assert (streamed.returncode, streamed.tail, streamed.exception_line) == (
        3,
        ["one", "two"],
        None,
    )
    assert capfd.readouterr().out == "one\ntwo\n"
    assert ticks  # the supervisor's work ran while it waited, and once at the end


# ---- only rank 0 talks to the host ------------------------------------------------------
class RecordingHost(Host):
    def __init__(self):
        self.calls = []

    def load_dataset(self, config):
        self.calls.append("load_dataset")
        return "rows"

    def running(self):
        self.calls.append("running")

    def progress(self, percent, eta_seconds=None):
        self.calls.append("progress")

    def fail(self, reason):
        self.calls.append("fail")

    def stopped(self, summary):
        self.calls.append("stopped")


def test_other_ranks_never_update_the_host(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    inner = RecordingHost()
    host = host_for_this_process(inner)
    assert host.load_dataset(None) == "rows"
    host.running(), host.progress(50.0), host.fail("x"), host.configure(None)
    assert inner.calls == ["load_dataset"]


def test_rank_zero_reports_a_clean_stop_to_the_launcher(tmp_path, monkeypatch):
    inner = RecordingHost()
    assert host_for_this_process(inner) is inner  # not launched: the host itself
    monkeypatch.setenv(sup.FAILURE_DIR_ENV, str(tmp_path))
    host = host_for_this_process(inner)
    host.running()
    host.stopped({"global_step": 5})
    assert inner.calls == ["running", "stopped"]
    assert (tmp_path / sup.STOPPED_MARKER).is_file()


def test_plan_is_frozen_and_counts_all_machines():
    plan = LaunchPlan("cuda", 8, 2, 0, "ddp", "bf16")
    assert plan.num_processes == 16
    with pytest.raises(AttributeError):
        plan.num_machines = 3  # type: ignore[misc]
