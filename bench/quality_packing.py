"""Quality of packing and of the variance-reducing estimators, on the demo job.

Run (from the repository root; about an hour on a shared 2-core machine):

    .venv/bin/python bench/quality_packing.py
    .venv/bin/python bench/quality_packing.py --runs padded packed   # a subset

Each run is the demo job (dllm_plugin/demo/job.json: MiniLM BERT, 237 chat rows, 10%
held out) trained through main.py for the same number of epochs (--epochs, default 30 =
the demo's 400 steps of 16 padded rows), so every run trains on the same real tokens:
  padded          the demo as it is (uniform timesteps);
  packed          packing on (default packing_trailing_eos);
  packed_eos0     packing with no trailing EOS;
  packed_b8       packing, batch_size 8 (about as many examples per step as padded);
  stratified      padded, timestep_sampling stratified;
  complementary   padded, complementary_masking.
Every trained model is then measured the same way on the held-out rows, each example
alone (no padding, no trailing EOS):
  heldout loss   the ELBO-weighted masked-token loss (linear schedule: 1/t), token
                 normalised, averaged over --draws keyed noise draws per example;
  heldout nll    the plain cross-entropy per masked token of the same draws;
  exact          answers generated greedily (the preview sampler, --gen-tokens new
                 tokens, blocks of 32) that equal the reference exactly;
  len err        mean |generated - reference| answer length in tokens;
  ran on         answers that used the whole generation budget (never stopped).
From each run's log: the step-to-step spread of the training loss (std of consecutive
differences over the second half) and the steps the in-run evaluation (always the plain
estimator) took to reach the padded run's final eval loss. JSON: bench/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "dllm_plugin" / "demo"
RESULTS = ROOT / "bench" / "results" / "quality.json"
RUNS: dict[str, dict[str, Any]] = {
    "padded": {},
    "packed": {"packing": True},
    "packed_eos0": {"packing": True, "packing_trailing_eos": 0},
    "packed_b8": {"packing": True, "batch_size": 8},
    "stratified": {"timestep_sampling": "stratified"},
    "complementary": {"complementary_masking": True},
}


def train(
    name: str, overrides: dict[str, Any], epochs: int, folder: Path, threads: int
) -> dict[str, Any]:
    """The demo job with `overrides`, through main.py in a fresh process."""
    print(f"training {name} ...", flush=True)
    config = json.loads((DEMO / "job.json").read_text())["config"]
    config.update(
        dataset_name=str(DEMO / "chat_demo.jsonl"),
        num_train_epochs=epochs,
        logging_steps=1,
        eval_steps=0.05,
        save_steps=1_000_000,  # no checkpoints: the final model is what is measured
        output_dir=str(folder / "out"),
        adaptor_name=name,
        **overrides,
    )
    folder.mkdir(parents=True, exist_ok=True)
    job = folder / "job.json"
    done = folder / "out" / "run_summary.json"
    if job.is_file() and json.loads(job.read_text()) == {"config": config} and done.is_file():
        summary = json.loads(done.read_text())
        if summary.get("status") == "complete":  # the same job already trained: reuse it
            print(f"reusing {name} ({done})", flush=True)
            return summary
    if (folder / "out").exists():
        import shutil

        shutil.rmtree(folder / "out")  # a stale or different run: start afresh
    job.write_text(json.dumps({"config": config}))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    env["OMP_NUM_THREADS"] = str(threads)
    started = time.time()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--input_file", str(job)],
        cwd=folder, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    (folder / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"run {name} failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    summary = json.loads((folder / "out" / "run_summary.json").read_text())
    summary["wall_s"] = time.time() - started
    return summary


def heldout_rows(config: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The demo's held-out split, tokenised as training tokenises it (unpacked)."""
    from dllm_plugin.config import build_job_config
    from dllm_plugin.hosts import Host
    from dllm_plugin.run import prepare

    cfg = build_job_config({**config, "packing": False}, source_dir=DEMO)
    prep = prepare(cfg, Host())
    return prep, prep.eval, prep.tokenizer


def heldout_loss(model: Any, evalset: Any, mask_id: int, draws: int) -> tuple[float, float]:
    """(ELBO loss, NLL per masked token) of each example alone over keyed draws."""
    import torch

    from dllm_plugin.rng import keyed_generator

    eps = 1e-3
    weighted, ce_sum, masked_n, maskable_n = 0.0, 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for e, row in enumerate(evalset):
            ids = torch.tensor(row["input_ids"])
            maskable = torch.tensor(row["labels"]) != -100
            batch, ts, masks = [], [], []
            for d in range(draws):
                g = keyed_generator("heldout", e, d)
                t = eps + (1 - eps) * torch.rand(1, generator=g).item()
                m = (torch.rand(len(ids), generator=g) < t) & maskable
                batch.append(torch.where(m, mask_id, ids))
                ts.append(t)
                masks.append(m)
            logp = torch.log_softmax(model(input_ids=torch.stack(batch)).logits.double(), -1)
            for d in range(draws):
                ce = -logp[d, masks[d]].gather(-1, ids[masks[d]][:, None]).squeeze(-1)
                weighted += float(ce.sum()) / ts[d]
                ce_sum += float(ce.sum())
                masked_n += int(masks[d].sum())
            maskable_n += int(maskable.sum()) * draws
    return weighted / maskable_n, ce_sum / max(masked_n, 1)


def generation(model: Any, prep: Any, evalset: Any, tokens: int) -> dict[str, float]:
    """Greedy answers to the held-out prompts: exact matches, length error, ran on."""
    from dllm_plugin.preview import answer_ids, sampling_config

    config = sampling_config(tokens)
    exact, errors, ran_on = 0, [], 0
    samples = []
    for row in evalset:
        prompt = row["input_ids"][: row["prompt_len"]]
        reference = prep.tokenizer.decode(
            row["input_ids"][row["prompt_len"] :], skip_special_tokens=True
        ).strip()
        got = answer_ids(model, prep.tokenizer, prep.ids, prep.method, prompt, config)
        n_got = len(prep.tokenizer(got, add_special_tokens=False).input_ids)
        n_ref = len(prep.tokenizer(reference, add_special_tokens=False).input_ids)
        exact += got == reference
        errors.append(abs(n_got - n_ref))
        ran_on += n_got >= tokens - 1
        samples.append({"reference": reference, "generated": got})
    n = len(evalset)
    return {
        "exact": exact / n,
        "len_err": statistics.mean(errors),
        "ran_on": ran_on / n,
        "samples": samples[:5],
    }


def log_stats(summary: dict[str, Any], target: float | None) -> dict[str, Any]:
    history = summary["log_history"]
    losses = [h["loss"] for h in history if "loss" in h and "step" in h]
    second = losses[len(losses) // 2 :]
    diffs = [b - a for a, b in zip(second, second[1:], strict=False)]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    reached = next((s for s, v in evals if target is not None and v <= target), None)
    return {
        "steps": summary["global_step"],
        "train_loss_step_std": statistics.pstdev(diffs) if len(diffs) > 1 else None,
        "final_eval_loss": evals[-1][1] if evals else None,
        "steps_to_padded_final_eval": reached,
        "eval_curve": evals,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--draws", type=int, default=32)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--work", default="/tmp/dllm-quality", help="run folders")
    parser.add_argument("--parallel", type=int, default=2, help="runs trained at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForMaskedLM

    base = json.loads((DEMO / "job.json").read_text())["config"]
    prep, evalset, _ = heldout_rows({**base, "dataset_name": str(DEMO / "chat_demo.jsonl")})
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    with ThreadPoolExecutor(args.parallel) as pool:
        summaries = dict(
            zip(
                args.runs,
                pool.map(
                    lambda n: train(n, RUNS[n], args.epochs, work / n, args.threads), args.runs
                ),
                strict=True,
            )
        )
    results: dict[str, Any] = {}
    for name, summary in summaries.items():
        model = AutoModelForMaskedLM.from_pretrained(summary["output_path"]).float()
        loss, nll = heldout_loss(model, evalset, prep.ids.mask_id, args.draws)
        gen = generation(model, prep, evalset, args.gen_tokens)
        results[name] = {
            "overrides": RUNS[name],
            "heldout_loss": loss,
            "heldout_nll": nll,
            **gen,
            "train_runtime_s": summary["metrics"].get("train_runtime"),
            "summary": summary,
            "preview_samples": summary.get("samples"),
        }
        print(f"  {name}: heldout loss {loss:.4f} nll {nll:.4f} exact {gen['exact']:.2f} "
              f"len err {gen['len_err']:.2f} ran on {gen['ran_on']:.2f}", flush=True)  # fmt: skip
    target = None
    if "padded" in results:
        target = log_stats(results["padded"]["summary"], None)["final_eval_loss"]
    for r in results.values():
        r.update(log_stats(r.pop("summary"), target))
    print_table(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"epochs": args.epochs, "results": results}, indent=2))
    print(f"wrote {args.out}")


def print_table(results: dict[str, Any]) -> None:
    padded = results.get("padded", {}).get("heldout_loss")
    print(
        f"\n{'run':<14}{'steps':>6}{'heldout':>9}{'vs pad':>8}{'nll':>7}{'exact':>7}"
        f"{'len err':>8}{'ran on':>7}{'step std':>9}{'to pad eval':>12}{'train s':>8}"
    )
    for name, r in results.items():
        rel = f"{100 * (r['heldout_loss'] / padded - 1):+.1f}%" if padded else "-"
        std = r["train_loss_step_std"]
        print(
            f"{name:<14}{r['steps']:>6}{r['heldout_loss']:>9.4f}{rel:>8}{r['heldout_nll']:>7.3f}"
            f"{r['exact']:>7.2f}{r['len_err']:>8.2f}{r['ran_on']:>7.2f}"
            f"{(std if std is not None else math.nan):>9.3f}"
            f"{str(r['steps_to_padded_final_eval']):>12}{r['train_runtime_s'] or 0:>8.0f}"
        )


if __name__ == "__main__":
    main()
