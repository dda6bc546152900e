"""`python -m dllm_plugin.gpu_check`: the command on CPU with tiny models, and its pure parts.

The command run (`--device cpu --tiny`) trains every family in every CPU mode through
the real trainers and checks its own output; the other tests pin the memory model, the
tables/JSON, the bf16-vs-fp32 and training checks, FLOP counting, the CPU memory meter
and the exit status against references written here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dllm_plugin.gpu_check import __main__ as command
from dllm_plugin.gpu_check.checks import (
    BF16_GRAD_RTOL,
    BF16_LOSS_RTOL,
    memory_check,
    precision_check,
    run_checks,
)
from dllm_plugin.gpu_check.measure import CpuMemoryMeter, step_flops, tensor_bytes
from dllm_plugin.gpu_check.memory_model import (
    MAX_BATCH,
    NF4_BYTES,
    Fit,
    Point,
    StaticMemory,
    fit_points,
    largest_batch,
    static_memory,
)
from dllm_plugin.gpu_check.report import fmt_bytes, render, to_json
from dllm_plugin.gpu_check.runner import Phase, RunResult, build_model_folder, load_options
from dllm_plugin.gpu_check.suite import DeviceReport
from dllm_plugin.gpu_check.workloads import MODES, PLANS, WORKLOADS, Shape, plan_runs

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the command, end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("gpu-check") / "result.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "dllm_plugin.gpu_check", "--device", "cpu", "--tiny",
         "--json", str(out)],
        cwd=out.parent, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_tiny_command_trains_every_family_and_mode(tiny_run) -> None:
    proc, data = tiny_run
    assert data["passed"] is True
    (device,) = data["devices"]
    plan = PLANS["tiny"]
    expected = {f"{f}/{s}/{m}" for f in WORKLOADS for s in plan.sizes for m in plan.modes} | {
        f"{f}/{plan.sizes[0]}/fp32 full" for f in WORKLOADS
    }
    assert {r["key"] for r in device["runs"]} == expected
    for run in device["runs"]:
        assert run["error"] is None and run["head_fallback"] is None
        steps = sum(p["steps"] for p in run["phases"])
        assert len(run["losses"]) == len(run["nlls"]) == len(run["peaks"]) == steps
        assert all(math.isfinite(x) for x in run["losses"] + run["nlls"])
        before, after = run["fixed_nll"]  # the repeated batch is learnt (fixed noise)
        assert after < before
        # Every measured peak holds at least the model's own weights.
        assert min(run["peaks"]) >= run["weight_bytes"] > 0
        assert run["step_s"] > 0 and run["mfu"] > 0 and run["tokens_per_s"] > 0


def test_tiny_command_checks_and_fits(tiny_run) -> None:
    proc, data = tiny_run
    (device,) = data["devices"]
    names = [c["name"] for c in device["checks"]]
    for family in WORKLOADS:
        assert f"{family}/tiny: bf16 vs fp32 step 1" in names
        for mode in PLANS["tiny"].modes:
            fit = device["fits"][f"{family}/{mode}"]
            assert len(fit["points"]) == 2 * (1 + PLANS["tiny"].extra_phases)
            assert fit["max_error"] <= 0.15
            assert 0 <= fit["coefs"]["g"] <= 1 and fit["coefs"]["a"] >= 0
    assert all(c["passed"] for c in device["checks"])
    models = {(r["model"], r["mode"]) for r in device["plan_rows"]}
    assert ("LLaDA-8B", "lora") in models and ("Dream-7B", "full+gc") in models
    out = proc.stdout
    assert "Training runs" in out and "Largest batch_size per max_length" in out
    assert f"{len(names)} checks: {len(names)} passed, 0 failed, 0 skipped" in out


def test_no_cuda_is_one_line_and_success(capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for argv in ([], ["--device", "cuda"]):
        assert command.main(argv) == 0
        out = capsys.readouterr().out
        assert out.splitlines() == [command.NO_CUDA]


def test_cpu_needs_tiny() -> None:
    with pytest.raises(SystemExit) as e:
        command.main(["--device", "cpu"])
    assert e.value.code == 2


def test_a_failing_run_fails_the_command(tmp_path, capsys) -> None:
    """A model folder without weights: that run fails, so the exit status is 1."""
    workload = WORKLOADS["llada"]
    broken = tmp_path / "models" / "llada-tiny"
    workload.config("tiny").save_pretrained(broken)  # config.json only
    code = command.main(
        ["--device", "cpu", "--tiny", "--families", "llada", "--launcher", "off",
         "--models-dir", str(tmp_path / "models"), "--json", str(tmp_path / "r.json")]
    )  # fmt: skip
    assert code == 1
    data = json.loads((tmp_path / "r.json").read_text())
    failed = {c["name"] for c in data["devices"][0]["checks"] if c["passed"] is False}
    assert "llada/tiny/full: trains" in failed
    assert "llada/tiny-2/full: loss finite and falling" not in failed  # the other size trains
    assert "FAIL" in capsys.readouterr().out


def test_launcher_ddp_on_two_cpu_processes_matches_accumulation(tmp_path) -> None:
    """Two gloo processes through main.py and the launcher vs one with accumulation 2."""
    from dllm_plugin.gpu_check.suite import launcher_report

    runs, checks = launcher_report("cpu", ("llada",), False, tmp_path)
    assert [(r.strategy, r.processes) for r in runs] == [("reference", 1), ("ddp", 2)]
    assert all(c.passed for c in checks), checks
    reference, ddp = runs
    assert len(ddp.losses) == 3 and ddp.losses[0] == pytest.approx(reference.losses[0], rel=1e-4)


# ---------------------------------------------------------------------- the memory model
def synthetic_points(coefs: dict[str, float], shapes: list[Shape], tokens: list[int]) -> list:
    points = []
    for shape in shapes:
        fixed, grads = 1e9 * shape.layers, 2e8 * shape.layers
        for t in tokens:
            peak = (
                fixed + coefs["g"] * grads + t * (coefs["a"] * shape.layers * shape.hidden)
                + t * coefs["c"] + coefs["e"]
            )  # fmt: skip
            points.append(
                Point(f"{shape.layers}", shape.layers, shape.hidden, t, fixed, grads, peak)
            )
    return points


SHAPES = [Shape(256, 4, 4, 4, 768), Shape(2048, 10, 16, 16, 6144)]


def test_fit_recovers_the_coefficients_of_exact_data() -> None:
    truth = {"g": 0.6, "a": 58.0, "c": 3000.0, "e": 1.2e8}
    fit = fit_points("llada", "full", synthetic_points(truth, SHAPES, [8192, 4096, 2048]))
    assert isinstance(fit, Fit)
    for name, value in truth.items():
        assert fit.coefs[name] == pytest.approx(value, rel=1e-6)
    assert fit.max_error < 1e-9


def test_fit_keeps_the_bounds_and_is_the_constrained_optimum() -> None:
    """Data made with g = 1.5 (impossible): g stops at 1; no feasible point fits better."""
    truth = {"g": 1.5, "a": 58.0, "c": 3000.0, "e": 1.2e8}
    points = synthetic_points(truth, SHAPES, [8192, 4096, 2048])
    fit = fit_points("llada", "full", points)
    assert fit.coefs["g"] == pytest.approx(1.0) and fit.coefs["a"] >= 0 and fit.coefs["c"] >= 0

    def sse(c: dict[str, float]) -> float:
        f = Fit("llada", "full", c, points)
        return sum(
            (
                f.predict(p.fixed_bytes, p.gradient_bytes, p.layers, p.hidden, p.tokens)
                - p.peak_bytes
            )
            ** 2
            for p in points
        )

    best = sse(fit.coefs)
    # Brute force over g in [0, 1]: for each g, unconstrained least squares for a, c, e.
    for g in [i / 50 for i in range(51)]:
        rows = torch.tensor(
            [[p.tokens * p.layers * p.hidden, p.tokens, 1.0] for p in points], dtype=torch.float64
        )
        target = torch.tensor(
            [p.peak_bytes - p.fixed_bytes - g * p.gradient_bytes for p in points],
            dtype=torch.float64,
        )
        a, c, e = torch.linalg.lstsq(rows, target[:, None], driver="gelsd").solution[:, 0].tolist()
        if a >= 0 and c >= 0:
            assert best <= sse({"g": g, "a": a, "c": c, "e": e}) * (1 + 1e-6)


def test_memory_check_fails_when_peaks_are_not_linear_in_tokens() -> None:
    points = synthetic_points({"g": 1.0, "a": 58.0, "c": 0.0, "e": 0.0}, SHAPES, [8192, 4096, 1024])
    quadratic = [
        Point(p.run, p.layers, p.hidden, p.tokens, p.fixed_bytes, p.gradient_bytes,
              p.peak_bytes + 2e2 * p.tokens**2 * p.layers)  # attention scores kept: l^2
        for p in points
    ]  # fmt: skip
    assert memory_check("llada", "full", fit_points("llada", "full", points)).passed is True
    check = memory_check("llada", "full", fit_points("llada", "full", quadratic))
    assert check.passed is False and "worst" in check.detail


def test_fit_needs_two_sizes() -> None:
    points = synthetic_points({"g": 1, "a": 1, "c": 1, "e": 1}, SHAPES[:1], [4, 2, 1])
    fit = fit_points("llada", "full", points)
    assert isinstance(fit, str)
    assert memory_check("llada", "full", fit).passed is None  # the runs' own checks fail


def test_largest_batch_matches_a_search() -> None:
    fit = Fit("llada", "lora", {"g": 0.5, "a": 80.0, "c": 2000.0, "e": 3e8})
    static = StaticMemory(16e9, 1.6e8, 0.0, 40_000_000, 8_000_000_000)
    shape = WORKLOADS["llada"].plan_shape
    budget = 120e9
    for length in (512, 1024, 4096):
        found = largest_batch(fit, static, shape, length, budget)

        def fits(b: int, length: int = length) -> bool:
            tokens = b * length
            peak = fit.predict(
                static.fixed, static.gradient_bytes, shape.layers, shape.hidden, tokens
            )
            return peak <= budget

        assert 0 < found < MAX_BATCH and fits(found) and not fits(found + 1)
    assert largest_batch(fit, static, shape, 512, static.fixed) == 0  # weights alone fill it
    flat = Fit("llada", "lora", {"g": 0.0, "a": 0.0, "c": 0.0, "e": 0.0})
    assert largest_batch(flat, static, shape, 512, budget) == MAX_BATCH


@pytest.mark.parametrize("mode", ["full", "lora", "4bit lora+gc"])
def test_static_memory_matches_the_loaded_model(mode: str, tmp_path) -> None:
    """Weights as the loader stores them, counted on a meta model, equal the real ones."""
    from dllm_plugin.models.loading import load_model

    if MODES[mode].load_in_4bit:
        from dllm_plugin.models.loading import check_bitsandbytes

        try:
            check_bitsandbytes()
        except Exception as e:
            pytest.skip(f"bitsandbytes cannot quantise here: {e}")
    workload = WORKLOADS["dream"]
    folder = build_model_folder(workload, "tiny", tmp_path)
    model = load_model(str(folder), "dream", load_options(MODES[mode])).model
    static = static_memory(workload, workload.config("tiny"), MODES[mode])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert static.trainable_params == sum(p.numel() for p in trainable)
    assert static.trainable_bytes == sum(p.numel() * p.element_size() for p in trainable)
    packed = [p for p in model.parameters() if type(p).__name__ == "Params4bit"]
    logical = sum(math.prod(p.quant_state.shape) for p in packed)
    assert static.quantized_params == logical
    others = tensor_bytes(model) - sum(p.untyped_storage().nbytes() for p in packed)
    assert static.weight_bytes == pytest.approx(others + logical * NF4_BYTES)
    if mode == "full":  # fp32 Linear weights get a bf16 autocast copy each
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert static.autocast_copy_bytes == 2 * linear


# ---------------------------------------------------------------------------- the checks
def result(nlls: list[float], **kw) -> RunResult:
    r = RunResult("llada/small/full", "llada", "small", "full", 4, 256, **kw)
    r.phases = [Phase(2, 8, len(nlls))]
    r.nlls, r.losses = nlls, [x + 1 for x in nlls]
    r.grad_norms = [1.0] * len(nlls)
    return r


def test_run_checks_need_a_falling_finite_loss_and_the_masked_head() -> None:
    assert all(c.passed for c in run_checks(result([11.7, 11.6, 11.5]), masked_only=True))
    flat = run_checks(result([11.7, 11.8, 11.7]), masked_only=False)
    assert [c.passed for c in flat] == [False]
    nan = run_checks(result([11.7, math.nan, 11.0]), masked_only=False)
    assert [c.passed for c in nan] == [False] and "non-finite" in nan[0].detail
    fallback = result([11.7, 11.0], head_fallback="it is a Linear4bit")
    assert [c.passed for c in run_checks(fallback, masked_only=True)] == [True, False]
    assert run_checks(result([], error="KeyError: 'x'"), masked_only=True)[0].passed is False
    too_big = run_checks(result([], skipped="out of memory"), masked_only=True)
    assert [c.passed for c in too_big] == [None] and "out of memory" in too_big[0].detail


def test_precision_check_tolerances() -> None:
    fp32 = result([10.0])
    fp32.losses, fp32.grad_norms = [10.0], [2.0]
    close = result([10.0])
    close.losses, close.grad_norms = (
        [10.0 * (1 + 0.9 * BF16_LOSS_RTOL)],
        [2.0 * (1 + 0.9 * BF16_GRAD_RTOL)],
    )
    assert precision_check(close, fp32).passed is True
    far = result([10.0])
    far.losses, far.grad_norms = [10.0 * (1 + 1.1 * BF16_LOSS_RTOL)], [2.0]
    assert precision_check(far, fp32).passed is False
    grad = result([10.0])
    grad.losses, grad.grad_norms = [10.0], [2.0 * (1 + 1.1 * BF16_GRAD_RTOL)]
    assert precision_check(grad, fp32).passed is False


# ------------------------------------------------------------------ measuring and reports
def test_cpu_meter_sees_the_peak_inside_a_step() -> None:
    meter = CpuMemoryMeter()
    model = torch.nn.Linear(256, 256)  # 257 kB of weights at the start
    meter.run_begin()
    with meter.recording(model):
        meter.step_begin()
        a = torch.empty(1_000_000, dtype=torch.uint8)
        b = torch.empty(3_000_000, dtype=torch.uint8)
        del a, b
        c = torch.empty(500_000, dtype=torch.uint8)
        meter.step_end()
        meter.step_begin()
        del c
        meter.step_end()
    start = (256 * 256 + 256) * 4
    assert meter.peaks == [start + 4_000_000, start + 500_000]


def test_step_flops_matches_counted_matmuls_plus_attention() -> None:
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForMaskedLM

    from dllm_plugin import models  # noqa: F401

    workload = WORKLOADS["llada"]
    shape = workload.sizes["tiny-2"]
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(workload.config("tiny-2"))
    b, length = 2, 48
    with FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, 500, (b, length))).logits.sum().backward()
    # Attention scores and their weighted sum: 2 matmuls of 2*l*l*head_dim per head,
    # forward and twice that backward (the CPU kernel is not counted by FlopCounterMode).
    head_dim = shape.hidden // shape.heads
    attention = 3 * 2 * 2 * b * shape.heads * length * length * head_dim * shape.layers
    reference = counter.get_total_flops() + attention
    assert step_flops(model, b * length, length, b * length, shape.layers) == pytest.approx(
        reference, rel=0.01
    )


def test_render_and_json() -> None:
    report = DeviceReport(
        "cuda:0", "H200", "default", 141e9, 120e9, {"flops_per_s": 8e14, "size": 8192},
        {"torch": "2.13"},
    )  # fmt: skip
    good = result([11.7, 11.5])
    good.step_s, good.tokens_per_s, good.mfu, good.peaks = 0.1, 80000.0, 0.41, [2_500_000_000] * 2
    good.total_params = good.trainable_params = 1_060_000_000
    report.runs = [good, result([], error="KeyError: 'lm_head'")]
    report.fits = {"llada/full": Fit("llada", "full", {"g": 1, "a": 58, "c": 3e3, "e": 1e8}),
                   "llada/lora": "needs measured peaks at two model sizes"}  # fmt: skip
    report.checks = run_checks(report.runs[1], masked_only=True)
    text = render([report], [], [])
    assert "1.06B" in text and "41.0%" in text and "2.5 GB" in text
    assert "FAILED: KeyError" in text and "not fitted" in text
    assert "1 checks: 0 passed, 1 failed, 0 skipped" in text
    data = json.loads(json.dumps(to_json([report], [], [])))
    assert data["passed"] is False
    assert data["devices"][0]["runs"][0]["peak_bytes"] == 2_500_000_000
    assert fmt_bytes(1.5e9) == "1.5 GB" and fmt_bytes(2048) == "2.0 kB"


def test_registry_rows_build_every_size() -> None:
    """A row is all a family needs: configs for every size with the right vocabulary."""
    for workload in WORKLOADS.values():
        for size in workload.sizes:
            config = workload.config(size)
            assert config.vocab_size == (512 if size.startswith("tiny") else workload.vocab)
        assert workload.plan_config().vocab_size == workload.vocab
    runs = plan_runs(PLANS["default"], tuple(WORKLOADS), can_4bit=False)
    assert not any(r.mode.load_in_4bit for r in runs)
    assert len(plan_runs(PLANS["default"], ("llada",), can_4bit=True)) == 1 + 2 * len(
        PLANS["default"].modes
    )


def test_imports_nothing_beyond_torch_transformers_peft_accelerate(tmp_path) -> None:
    """A bare GPU environment: importing the command adds only our own modules, stdlib and
    more of torch/transformers/peft/accelerate (a2d imports transformers' causal models)."""
    probe = """
import sys
import torch, transformers, peft, accelerate
from transformers import AutoModelForMaskedLM, Trainer, TrainingArguments
try:
    import bitsandbytes
except Exception:
    pass
before = set(sys.modules)
from dllm_plugin.gpu_check import __main__, data_parallel, suite
allowed = {"torch", "transformers", "peft", "accelerate", "bitsandbytes"}
new = {n.split(".")[0] for n in set(sys.modules) - before} - allowed
third = sorted(n for n in new if "-packages" in (getattr(sys.modules.get(n), "__file__", None) or ""))
print("THIRD", third)
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("THIRD"))
    assert line == "THIRD []"
